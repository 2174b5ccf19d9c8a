"""COCO instance-segmentation JSON (polygons, uncompressed and compressed RLE) → records."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import InputError


def polygons_to_mask(polygons: list[list[float]], size_hw: tuple[int, int]) -> np.ndarray:
    """Fill COCO-style polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixels) into an (H, W) bool mask."""
    import cv2

    h, w = size_hw
    canvas = np.zeros((h, w), dtype=np.uint8)
    pts = [np.round(np.asarray(p, dtype=np.float64).reshape(-1, 2)).astype(np.int32) for p in polygons if len(p) >= 6]
    if pts:
        cv2.fillPoly(canvas, pts, 1)
    return canvas.astype(bool)


def read_coco(annotation_json: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *,
              dataset: str = "coco", min_area: int = 1, limit: int | None = None,
              include_crowd: bool = False) -> list[InstanceRecord]:
    """Read a COCO instance JSON; images resolve against ``image_root`` (default: the JSON's folder)."""
    path = Path(annotation_json)
    if not path.is_file():
        raise InputError(f"COCO annotation file {str(path)!r} does not exist; pass the instances_*.json path")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InputError(f"{str(path)!r} is not a COCO instance file (needs 'images' and 'annotations' lists)")
    root = Path(image_root) if image_root is not None else path.parent
    names = {c["id"]: c.get("name", str(c["id"])) for c in data.get("categories", [])}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    records = []
    for img in data["images"]:
        h, w = int(img["height"]), int(img["width"])
        masks, classes = [], []
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            seg = ann.get("segmentation")
            if isinstance(seg, list):
                m = polygons_to_mask(seg, (h, w))
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                from segany.data.formats.common import decode_rle

                m = decode_rle({"size": seg["size"], "counts": seg["counts"]})
            elif isinstance(seg, dict):
                masks.append({"size": [h, w], "counts": seg["counts"] if isinstance(seg["counts"], str)
                              else seg["counts"].decode("ascii")})
                classes.append(names.get(ann.get("category_id"), ""))
                continue
            else:
                continue
            if m.sum() < min_area:
                continue
            masks.append(encode_mask(m))
            classes.append(names.get(ann.get("category_id"), ""))
        records.append(InstanceRecord(image_path=str(root / img["file_name"]), size_hw=(h, w), masks=masks,
                                      class_names=classes, image_id=str(img["id"]), dataset=dataset))
        if limit is not None and len(records) >= limit:
            break
    return records
