"""SA-1B annotation files: one JSON per image (Kirillov et al. 2023, SA-1B dataset card).

``{"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation, bbox, area,
predicted_iou, stability_score, crop_box, point_coords}, ...]}``, where ``segmentation`` is a COCO
RLE whose ``counts`` is a str and ``bbox``/``crop_box`` are XYWH pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segany.atomic import atomic_write_text
from segany.data.rle import coco_to_mask, mask_to_coco
from segany.errors import InputError

_ANN_KEYS = ("id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "crop_box", "point_coords")


@dataclass
class Sa1bImage:
    image_id: int
    width: int
    height: int
    file_name: str
    annotations: list[dict[str, Any]] = field(default_factory=list)

    def masks(self) -> np.ndarray:
        """All masks decoded, (N, H, W) bool."""
        if not self.annotations:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.stack([coco_to_mask(a["segmentation"]) for a in self.annotations])


def to_sa1b(records: list[dict[str, Any]], *, image_id: int, file_name: str, size_hw: tuple[int, int]
            ) -> dict[str, Any]:
    """SA-1B dict from generator records (any ``output_mode``; masks are converted to COCO RLE)."""
    h, w = size_hw
    anns = []
    for i, r in enumerate(records):
        seg = r["segmentation"]
        if isinstance(seg, np.ndarray):
            seg = mask_to_coco(seg)
        elif isinstance(seg.get("counts"), list):
            seg = mask_to_coco(coco_to_mask(seg))
        anns.append({"id": i, "segmentation": {"size": [int(seg["size"][0]), int(seg["size"][1])],
                                               "counts": seg["counts"]},
                     "bbox": [float(v) for v in r["bbox"]], "area": int(r["area"]),
                     "predicted_iou": float(r["predicted_iou"]), "stability_score": float(r["stability_score"]),
                     "crop_box": [float(v) for v in r["crop_box"]],
                     "point_coords": [[float(x), float(y)] for x, y in r["point_coords"]],
                     **({"label": r["label"], "label_score": float(r["label_score"])} if "label" in r else {})})
    return {"image": {"image_id": int(image_id), "width": int(w), "height": int(h), "file_name": str(file_name)},
            "annotations": anns}


def write_sa1b(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write an SA-1B dict atomically (temp file in the same folder, then ``os.replace``)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=True)
    return atomic_write_text(path, text, fsync=True)  # resumed runs trust a present file as complete


def read_sa1b(path: str | os.PathLike[str]) -> Sa1bImage:
    """Read and check one SA-1B JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"SA-1B file {str(p)!r} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(p)!r} is not valid JSON ({exc}); the file may be truncated: regenerate it") from exc
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise InputError(f"{str(p)!r} is not an SA-1B file: expected keys 'image' and 'annotations'")
    im = data["image"]
    missing = [k for k in ("image_id", "width", "height", "file_name") if k not in im]
    if missing:
        raise InputError(f"{str(p)!r}: 'image' lacks {', '.join(missing)}")
    for j, a in enumerate(data["annotations"]):
        lacks = [k for k in _ANN_KEYS if k not in a]
        if lacks:
            raise InputError(f"{str(p)!r}: annotation {j} lacks {', '.join(lacks)}")
        if list(a["segmentation"]["size"]) != [im["height"], im["width"]]:
            raise InputError(f"{str(p)!r}: annotation {j} has size {a['segmentation']['size']} but the image is "
                             f"{im['height']}x{im['width']}")
    return Sa1bImage(int(im["image_id"]), int(im["width"]), int(im["height"]), str(im["file_name"]),
                     list(data["annotations"]))
