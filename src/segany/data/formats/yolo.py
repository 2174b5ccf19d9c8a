"""YOLO segmentation folders (Ultralytics layout with ``data.yaml``, e.g. coco128-seg) → records.

Each label line is ``class x1 y1 ... xn yn`` with vertices normalized to [0, 1]; one polygon per line.
Images without a label file have no objects; label files without an image are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from segany.data.formats.coco import polygons_to_mask
from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _class_names(root: Path) -> dict[int, str]:
    yaml_path = root / "data.yaml"
    if not yaml_path.exists():
        return {}
    import yaml

    data = yaml.safe_load(yaml_path.read_text()) or {}
    names = data.get("names", {})
    if isinstance(names, list):
        return dict(enumerate(names))
    return {int(k): str(v) for k, v in names.items()}


def read_yolo_seg(root: str | os.PathLike[str], split: str = "train2017", *, dataset: str = "coco128",
                  min_area: int = 1, limit: int | None = None) -> list[InstanceRecord]:
    base = Path(root)
    img_dir, lbl_dir = base / "images" / split, base / "labels" / split
    if not img_dir.is_dir():
        raise InputError(f"{str(img_dir)!r} is not a folder; a YOLO-seg dataset needs images/<split>/ and "
                         "labels/<split>/ (pass the dataset root and --split)")
    names = _class_names(base)
    records = []
    for img_path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        with Image.open(img_path) as im:
            w, h = im.size
        masks, classes = [], []
        lbl = lbl_dir / (img_path.stem + ".txt")
        if lbl.exists():
            for line in lbl.read_text().splitlines():
                parts = line.split()
                if len(parts) < 7:
                    continue
                xy = np.asarray(parts[1:], dtype=np.float64).reshape(-1, 2) * [w, h]
                m = polygons_to_mask([xy.ravel().tolist()], (h, w))
                if m.sum() < min_area:
                    continue
                masks.append(encode_mask(m))
                classes.append(names.get(int(parts[0]), parts[0]))
        records.append(InstanceRecord(image_path=str(img_path), size_hw=(h, w), masks=masks, class_names=classes,
                                      image_id=img_path.stem, dataset=dataset))
        if limit is not None and len(records) >= limit:
            break
    return records
