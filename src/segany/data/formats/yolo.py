"""YOLO segmentation folders (Ultralytics layout with ``data.yaml``, e.g. coco128-seg) → records.

Each label line is ``class x1 y1 ... xn yn`` with vertices normalized to [0, 1]; one polygon per line.
Images without a label file have no objects; label files without an image are ignored. A malformed
line is refused with its file and line number, since a wrong polygon would train the model on it.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from segany.data.formats.common import (
    IMAGE_FRAMES,
    InstanceRecord,
    ReadReport,
    encode_mask,
    image_frames_hw,
    note,
)
from segany.errors import InputError, require
from segany.yaml_errors import safe_load_unique, yaml_problem


def polygon_to_mask(xy: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Fill one YOLO polygon, (N, 2) in pixels, the way Ultralytics (the format's trainer) does: coordinates
    truncated to int, then cv2.fillPoly with the edges included.

    Not pycocotools' fill, which COCO polygons mean: a YOLO file is made for this fill, and segany's YOLO
    export writes its vertices for it, so an exported project reads back to exactly its masks.
    """
    import cv2

    canvas = np.zeros(size_hw, dtype=np.uint8)
    if len(xy) >= 3:
        cv2.fillPoly(canvas, [np.asarray(xy, dtype=np.float64).astype(np.int32)], 1)
    return canvas.astype(bool)


# Rounding in exporters writes 1.0000001; only a vertex farther off the image is a labeling problem.
_SLACK = 1e-4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _class_names(root: Path) -> dict[int, str]:
    """data.yaml's ``names`` as {class index: name}; {} when there is no data.yaml or it names no classes.

    Accepts both Ultralytics forms, a list (``names: [person, car]``) and a mapping (``names: {0: person}``);
    anything else is refused, since a misread class table would give every polygon the wrong class.
    """
    yaml_path = root / "data.yaml"
    if not yaml_path.exists():
        return {}
    yaml: Any = require("yaml", "train")  # pyyaml: one install hint, not a bare ModuleNotFoundError

    fix = "names: [person, car] or names: {0: person, 1: car}"
    try:
        data = safe_load_unique(yaml_path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{yaml_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise InputError(f"{yaml_path}: cannot be read ({exc.__class__.__name__}: {exc}); data.yaml must be a "
                         "readable file") from exc
    except yaml.YAMLError as exc:
        problem, at = yaml_problem(exc)
        raise InputError(f"{yaml_path}: not valid YAML ({problem}{at}); fix the syntax, e.g. {fix}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{yaml_path}: holds a {type(data).__name__}, not a mapping; data.yaml is keys and values, "
                         f"e.g. {fix}")
    names = data.get("names")
    if names is None:
        return {}
    if isinstance(names, list):
        return {i: str(v) for i, v in enumerate(names)}
    if not isinstance(names, dict):
        raise InputError(f"{yaml_path}: names is a {type(names).__name__} ({names!r}); it must list the classes "
                         f"in index order: {fix}")
    out: dict[int, str] = {}
    for k, v in names.items():
        try:
            index = int(k)
        except (TypeError, ValueError):
            swap = f" (it maps {k!r} to {v!r}: swap them, {v!r}: {k!r})" if isinstance(v, int) else ""
            raise InputError(f"{yaml_path}: names has the key {k!r}, not a class index{swap}; names maps each "
                             f"class index to its name: {fix}") from None
        if index < 0 or isinstance(k, bool):
            raise InputError(f"{yaml_path}: names has the key {k!r}, not a class index; indices count from 0: {fix}")
        out[index] = str(v)
    return out


def parse_label_line(line: str, where: str) -> tuple[int, np.ndarray]:
    """``class x1 y1 ... xn yn`` → (class index, (n, 2) normalized vertices); ``where`` is ``file:line``."""
    parts = line.split()
    if len(parts) == 5:
        raise InputError(f"{where}: 5 values is a YOLO box label (class cx cy w h); segany needs segmentation "
                         "polygons (class x1 y1 x2 y2 x3 y3 ...): export your labels as YOLO-seg")
    if len(parts) < 7 or len(parts) % 2 == 0:
        raise InputError(f"{where}: expected a class and at least 3 x y pairs, got {len(parts)} values; "
                         "each line is `class x1 y1 x2 y2 x3 y3 ...` (normalized 0-1)")
    try:
        cls = int(parts[0])
        xy = np.asarray([float(v) for v in parts[1:]], dtype=np.float64).reshape(-1, 2)
    except ValueError as exc:
        raise InputError(f"{where}: not a number ({exc}); each line is `class x1 y1 x2 y2 ...` with a whole "
                         "class index and normalized coordinates") from exc
    if not np.isfinite(xy).all():  # float() takes "nan" and "inf"; filled, they make a garbage polygon
        raise InputError(f"{where}: a coordinate is {parts[1 + int(np.flatnonzero(~np.isfinite(xy.ravel()))[0])]!r}; "
                         "each coordinate is a number from 0 to 1: fix or remove the line")
    if cls < 0:
        raise InputError(f"{where}: class index {cls} is negative; classes count from 0 (the order of data.yaml's names)")
    return cls, xy


def _split_dirs(base: Path, split: str | None) -> list[str]:
    """The splits to read: the one asked for, or every folder under ``images/`` ("" when images lie there)."""
    img_root = base / "images"
    if split is not None:
        if not (img_root / split).is_dir():
            raise InputError(f"{str(img_root / split)!r} is not a folder; a YOLO-seg dataset needs images/<split>/ "
                             "and labels/<split>/ (pass the dataset root; --split NAME picks the split folder)")
        return [split]
    if not img_root.is_dir():
        raise InputError(f"{str(img_root)!r} is not a folder; a YOLO-seg dataset root holds images/ and labels/ "
                         "(images/<split>/x.jpg beside labels/<split>/x.txt)")
    subs = sorted(p.name for p in img_root.iterdir() if p.is_dir())
    return subs or [""]


def read_yolo_seg(root: str | os.PathLike[str], split: str | None = "train2017", *, dataset: str = "coco128",
                  min_area: int = 1, limit: int | None = None, categories: Collection[str] | None = None,
                  report: ReadReport | None = None) -> list[InstanceRecord]:
    """Read one split (or, with ``split=None``, every split folder) of a YOLO-seg dataset.

    ``categories`` keeps only polygons of those class names (from ``data.yaml``; the index when it has none).
    Unreadable images go to ``report.bad`` (or raise without a report). Each record carries the frames read
    from its image's header in ``extra[IMAGE_FRAMES]``, so packing does not open the image a second time.
    """
    base = Path(root)
    names = _class_names(base)
    wanted = set(categories) if categories else None
    if wanted is not None:
        known = set(names.values()) if names else None
        if known is not None and wanted - known:
            raise InputError(f"--categories names {', '.join(map(repr, sorted(wanted - known)))}, not in "
                             f"{str(base / 'data.yaml')!r}; it has {', '.join(sorted(known))}")
    records: list[InstanceRecord] = []
    seen: dict[str, Path] = {}
    clipped: list[str] = []  # file:line of polygons with vertices off the image
    for sp in _split_dirs(base, split):
        img_dir, lbl_dir = base / "images" / sp, base / "labels" / sp
        for img_path in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if img_path.stem in seen:
                raise InputError(f"{img_path} and {seen[img_path.stem]} share the name {img_path.stem!r}; image "
                                 "names must be unique across splits: rename one, or pack one split (--split)")
            seen[img_path.stem] = img_path
            frames = image_frames_hw(img_path, report)
            if frames is None:
                continue
            # YOLO labels are fractions of the picture as shown: Ultralytics reads images with their EXIF
            # orientation applied (OpenCV's imread does, and its label checks use the rotated size). So a
            # phone photo's polygons are drawn on the shown frame, and the pack rotates its pixels to match.
            _, size_hw, orientation = frames
            # The frames go with the record, so packing's size check does not open the image again.
            extra = {"yolo_split": sp, IMAGE_FRAMES: frames, **({"exif_frame": "shown"} if orientation != 1 else {})}
            masks, classes = _label_masks(lbl_dir / (img_path.stem + ".txt"), size_hw, names, wanted, min_area,
                                          clipped)
            records.append(InstanceRecord(image_path=str(img_path), size_hw=size_hw, masks=masks,
                                          class_names=classes, image_id=img_path.stem, dataset=dataset,
                                          extra=extra))
            if limit is not None and len(records) >= limit:
                break
        if limit is not None and len(records) >= limit:
            break
    if clipped:
        note(report, f"{len(clipped)} YOLO label line(s) have coordinates outside 0-1 (e.g. {clipped[0]}); their "
                     "polygons were clipped to the image: check those labels")
    return records


def _label_masks(lbl: Path, size_hw: tuple[int, int], names: dict[int, str], wanted: set[str] | None,
                 min_area: int, clipped: list[str]) -> tuple[list[dict], list[str]]:
    """Masks and class names of one label file; appends ``file:line`` of off-image polygons to ``clipped``.

    A class index that ``data.yaml`` does not name is refused: packed as a bare number it would become a
    class of its own, and it is most often a labeling slip (or labels of another dataset).
    """
    h, w = size_hw
    masks, classes = [], []
    if not lbl.exists():
        return masks, classes
    raw = lbl.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a label file saved by Windows Notepad may start with a BOM
    except UnicodeDecodeError as exc:
        line_at = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"{lbl}:{line_at}: not UTF-8 text (byte {raw[exc.start]:#04x}); YOLO label files hold "
                         "only numbers: save the file as UTF-8 (or ASCII) and check that line") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{lbl}:{lineno}"
        cls, xy = parse_label_line(line, where)
        if names and cls not in names:
            known = ", ".join(f"{k}: {v}" for k, v in sorted(names.items())[:10])
            more = ", ..." if len(names) > 10 else ""
            raise InputError(f"{where}: class {cls} is not in data.yaml's names ({known}{more}); fix the label, "
                             "or add the class to data.yaml")
        if (xy < -_SLACK).any() or (xy > 1 + _SLACK).any():
            clipped.append(where)
        name = names.get(cls, str(cls))
        if wanted is not None and name not in wanted:
            continue
        m = polygon_to_mask(xy * [w, h], (h, w))
        if m.sum() < min_area:
            continue
        masks.append(encode_mask(m))
        classes.append(name)
    return masks, classes
