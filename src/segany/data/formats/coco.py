"""COCO instance-segmentation JSON (polygons, uncompressed and compressed RLE) → records.

A user's own COCO export is often rough: images without ``height``/``width``, RLEs made for another
image size, polygons with a stray coordinate, annotations pointing at images that are not listed. Each
is either refused with the file, annotation id and fix, or skipped and counted in a :class:`ReadReport`;
nothing is stretched or dropped without a word.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segany.data.formats.common import (
    RLE,
    InstanceRecord,
    ReadReport,
    _string_to_counts,
    decode_rle,
    encode_mask,
    image_frames_hw,
    note,
    rle_area,
)
from segany.errors import InputError


def polygons_to_mask(polygons: list[list[float]], size_hw: tuple[int, int]) -> np.ndarray:
    """Fill COCO-style polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixels) into an (H, W) bool mask.

    Filled by pycocotools, since its rasteriser defines what a COCO polygon covers (pixel x spans [x, x+1];
    the parts of one annotation are united). A hand fill differs: cv2.fillPoly on rounded vertices grows a
    mask by about half a pixel on every side and leaves the overlap of two parts empty.
    """
    from pycocotools import mask as mask_utils

    h, w = size_hw
    parts = [[float(v) for v in p] for p in polygons if len(p) >= 6]
    if not parts:
        return np.zeros((h, w), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    return mask_utils.decode(rle).astype(bool)


def _where(path: Path, ann: dict[str, Any]) -> str:
    return f"{path}: annotation {ann.get('id', '?')} (image_id {ann.get('image_id', '?')})"


# Beyond this a coordinate is no pixel position (pycocotools' int32 raster would overflow on it).
_MAX_COORD = 1e6


def _check_polygons(seg: list[Any], path: Path, ann: dict[str, Any]) -> None:
    for poly in seg:
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
            raise InputError(f"{_where(path, ann)} has a polygon that is not a list of numbers; COCO polygons are "
                             "[[x0, y0, x1, y1, ...], ...] in pixels: fix or remove it")
        if len(poly) % 2:
            raise InputError(f"{_where(path, ann)} has a polygon with {len(poly)} coordinates, an odd count; "
                             "COCO polygons are x, y pairs: fix or remove it")
        bad = [v for v in poly if not math.isfinite(v) or abs(v) > _MAX_COORD]
        if bad:
            raise InputError(f"{_where(path, ann)} has a polygon coordinate {bad[0]!r}, which is not a pixel "
                             "position; COCO polygons are x, y pixel coordinates: fix or remove it")


def _checked_rle(seg: dict[str, Any], size_hw: tuple[int, int], path: Path, ann: dict[str, Any]) -> RLE:
    """The annotation's RLE with str counts, refused when it was made for another image size."""
    h, w = size_hw
    size = seg.get("size", [])
    try:
        rle_size = [int(v) for v in size] if isinstance(size, list) else []
    except (TypeError, ValueError):
        rle_size = []
    if rle_size != [h, w]:
        got = "x".join(map(str, rle_size)) or "no size"
        raise InputError(f"{_where(path, ann)} has an RLE of size {got} but its image is {h}x{w}; "
                         "re-export the mask at the image's size, or fix the image's height/width")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise InputError(f"{_where(path, ann)} has RLE counts that are not all whole numbers >= 0; "
                             "the annotation is corrupt: re-export it")
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        if isinstance(counts, bytes):
            counts = counts.decode("ascii", errors="replace")
        try:
            total = sum(_string_to_counts(counts))
        except ValueError as exc:
            raise InputError(f"{_where(path, ann)} has a compressed RLE that cannot be read: {exc}; the "
                             "annotation is corrupt: re-export it") from exc
    else:
        raise InputError(f"{_where(path, ann)} has RLE counts of type {type(counts).__name__}; COCO counts are "
                         "a string (compressed) or a list of run lengths: re-export the annotation")
    if total != h * w:
        raise InputError(f"{_where(path, ann)}: RLE counts cover {total} pixels but its size {h}x{w} has {h * w}; "
                         "the annotation is corrupt: re-export it")
    if isinstance(counts, list):
        return encode_mask(decode_rle({"size": [h, w], "counts": counts}))
    return {"size": [h, w], "counts": counts}


def _image_size(img: dict[str, Any], file: Path, report: ReadReport | None, path: Path,
                anns: Sequence[dict[str, Any]] = ()) -> tuple[int, int] | None:
    """(H, W) from the entry, or from the image file when the entry lacks it (common in hand-made files).

    From the file, a photo with an EXIF quarter turn has two frames: the pixels as stored, and the picture as
    shown. The annotations say which they were drawn on: the shown frame when they reach past the stored one
    and fit the shown one (an RLE's own size names it outright); else the stored frame, packing's rule when
    both fit. Sized by the stored frame alone, labels drawn on the shown picture were cut off or left out.
    """
    try:
        h, w = int(img["height"]), int(img["width"])
    except (KeyError, TypeError, ValueError):
        frames = image_frames_hw(file, report)
        if frames is None:
            return None
        stored, shown, _ = frames
        if stored == shown:
            return stored
        sizes = {tuple(a["segmentation"]["size"]) for a in anns if isinstance(a.get("segmentation"), dict)
                 and isinstance(a["segmentation"].get("size"), list) and len(a["segmentation"]["size"]) == 2}
        if shown in sizes and stored not in sizes:
            return shown
        reach_y, reach_x = _reach(anns)  # of the polygons and boxes
        past_stored = reach_y > stored[0] or reach_x > stored[1]
        return shown if past_stored and reach_y <= shown[0] and reach_x <= shown[1] else stored
    if h <= 0 or w <= 0:
        raise InputError(f"{path}: image {img.get('id')!r} ({str(img.get('file_name', '?'))!r}) has height {h} and "
                         f"width {w}; an image needs both >= 1: fix them, or remove both keys so segany reads the "
                         "size from the image file")
    return h, w


def _reach(anns: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The largest y and x any polygon vertex or box of ``anns`` reaches (0, 0 for none)."""
    ys, xs = [0.0], [0.0]
    for a in anns:
        seg, box = a.get("segmentation"), a.get("bbox")
        if isinstance(seg, list):
            for poly in seg:
                if isinstance(poly, list) and len(poly) >= 2:
                    with contextlib.suppress(TypeError, ValueError):
                        xs.append(max(float(v) for v in poly[0::2]))
                        ys.append(max(float(v) for v in poly[1::2]))
        if isinstance(box, list) and len(box) == 4:
            with contextlib.suppress(TypeError, ValueError):
                xs.append(float(box[0]) + float(box[2]))
                ys.append(float(box[1]) + float(box[3]))
    return max(ys), max(xs)


def _check_entries(data: dict[str, Any], path: Path) -> None:
    """Refuse the shapes that would otherwise fail deep inside the reader with a bare KeyError or TypeError:
    'images'/'annotations'/'categories' that are not lists of objects, and images or categories without an id."""
    for key in ("images", "annotations", "categories"):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise InputError(f"{path}: '{key}' is a {type(entries).__name__}, not a list; a COCO instances file "
                             f"has '{key}': [{{...}}, ...]: fix the file")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InputError(f"{path}: '{key}'[{i}] is {entry!r:.40}, not an object; fix or remove it")
            if key != "annotations" and "id" not in entry:
                raise InputError(f"{path}: '{key}'[{i}] ({str(entry.get('file_name', entry.get('name', '?')))!r}) "
                                 "has no 'id'; give it one (annotations refer to it by id)")


def _category_names(data: dict[str, Any], path: Path, categories: Collection[str] | None) -> dict[Any, str]:
    names = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}
    unknown = sorted(set(categories or ()) - set(names.values()))
    if unknown:
        raise InputError(f"--categories names {', '.join(map(repr, unknown))}, not in {str(path)!r}; it has "
                         f"{', '.join(sorted(set(names.values()))) or 'no categories'}")
    return names


def _check_id_types(by_image: dict[Any, list[dict]], listed: set[Any], path: Path) -> None:
    """Refuse annotations whose ``image_id`` names an image only as another type ("1" for 1): they would be
    left out as belonging to no image, and a file written that way has no annotation left at all."""
    as_text = {str(i): i for i in listed if isinstance(i, (int, str))}
    retyped = [i for i in by_image if i not in listed and isinstance(i, (int, str)) and str(i) in as_text
               and type(i) is not type(as_text[str(i)])]
    if not retyped:
        return
    count = sum(len(by_image[i]) for i in retyped)
    first, image = retyped[0], as_text[str(retyped[0])]

    def kind(v: Any) -> str:
        return "text" if isinstance(v, str) else "a number"

    raise InputError(f"{path}: {count} annotation(s) give image_id as {kind(first)} ({first!r}) where 'images' gives "
                     f"the id as {kind(image)} ({image!r}); COCO ids must match exactly: write each annotation's "
                     f"image_id as its image's id is written")


def _check_unique_ids(images: list[dict[str, Any]], path: Path) -> None:
    """Refuse two ``images`` entries with one id (their annotations could not be told apart, and both would be
    packed under one file name, one image overwriting the other), or with one file (merged exports repeat a
    file under a new id: the picture was packed once per id and could be trained on and evaluated on)."""
    seen: dict[Any, str] = {}
    files: dict[str, Any] = {}
    for img in images:
        image_id, file_name = img.get("id"), str(img.get("file_name", ""))
        if image_id in seen:
            raise InputError(f"{path}: images {seen[image_id]!r} and {file_name!r} share the id {image_id!r}; "
                             "each entry of 'images' needs its own id: give one a new id (and move its "
                             "annotations' image_id)")
        seen[image_id] = file_name
        key = os.path.normpath(file_name)
        if key in files:
            raise InputError(f"{path}: images {files[key]!r} and {image_id!r} are both {file_name!r}; one picture "
                             "would be packed twice (and could be trained and evaluated on): keep one entry and "
                             "move the other's annotations to its image_id")
        files[key] = image_id


def read_coco(annotation_json: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *,
              dataset: str = "coco", min_area: int = 1, limit: int | None = None,
              include_crowd: bool = False, categories: Collection[str] | None = None,
              report: ReadReport | None = None) -> list[InstanceRecord]:
    """Read a COCO instance JSON; images resolve against ``image_root`` (default: the JSON's folder).

    ``categories`` keeps only annotations of those class names. Images that cannot be sized go to
    ``report.bad`` (or raise without a report); annotations of unlisted images are counted in ``report.notes``.
    """
    path = Path(annotation_json)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.json"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise InputError(f"COCO annotation file {str(path)!r} is a folder{hint}; --coco takes the instances JSON "
                         f"file itself, e.g. --coco {str(path / (found[0] if found else 'instances.json'))!r}, "
                         "and --images the image folder")
    if not path.is_file():
        raise InputError(f"COCO annotation file {str(path)!r} does not exist; pass the instances_*.json path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({exc}); pass a COCO instances file") from exc
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InputError(f"{str(path)!r} is not a COCO instance file (needs 'images' and 'annotations' lists)")
    _check_entries(data, path)
    root = Path(image_root) if image_root is not None else path.parent
    names = _category_names(data, path, categories)
    wanted = set(categories) if categories else None
    _check_unique_ids(data["images"], path)
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann.get("image_id")].append(ann)
    listed = {img.get("id") for img in data["images"]}
    _check_id_types(by_image, listed, path)
    orphans = sum(len(anns) for image_id, anns in by_image.items() if image_id not in listed)
    if orphans:
        note(report, f"{path}: {orphans} annotation(s) name an image_id that is not in 'images'; left out")
    records = []
    skipped: Counter[str] = Counter()
    for img in data["images"]:
        file = root / str(img.get("file_name", ""))
        size_hw = _image_size(img, file, report, path, by_image.get(img.get("id"), []))
        if size_hw is None:
            continue
        masks, classes = _image_masks(by_image.get(img.get("id"), []), size_hw, path, names, wanted,
                                      min_area=min_area, include_crowd=include_crowd, skipped=skipped)
        records.append(InstanceRecord(image_path=str(file), size_hw=size_hw, masks=masks,
                                      class_names=classes, image_id=str(img["id"]), dataset=dataset))
        if limit is not None and len(records) >= limit:
            break
    for reason, count in sorted(skipped.items()):
        note(report, f"{path}: {count} annotation(s) {SKIP_REASONS[reason]}; left out")
    if report is not None:
        report.skipped.update(skipped)
    return records


# Why an annotation of a listed image is not packed (counted per reason in a warning, never dropped quietly).
SKIP_REASONS = {
    "crowd": "are crowd regions (iscrowd=1: one outline around many objects, which SAM does not learn from)",
    "no_segmentation": "have no segmentation (a bbox-only annotation; segany needs polygons or an RLE)",
    "empty_segmentation": "have an empty segmentation ([] or polygons of fewer than 3 points)",
    "empty_mask": "have a mask of no pixels inside the image",
}


def _image_masks(anns: list[dict[str, Any]], size_hw: tuple[int, int], path: Path, names: dict[Any, str],
                 wanted: set[str] | None, *, min_area: int, include_crowd: bool, skipped: Counter[str]
                 ) -> tuple[list[RLE], list[str]]:
    """The masks (RLE) and class names of one image's annotations; ``skipped`` counts those left out by
    reason (annotations of unwanted ``categories`` are not counted: leaving them out was asked for)."""
    masks, classes = [], []
    for ann in anns:
        name = names.get(ann.get("category_id"), "")
        if wanted is not None and name not in wanted:
            continue
        if ann.get("iscrowd", 0) and not include_crowd:
            skipped["crowd"] += 1
            continue
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            _check_polygons(seg, path, ann)
            if not any(len(poly) >= 6 for poly in seg):
                skipped["empty_segmentation"] += 1
                continue
            rle = encode_mask(polygons_to_mask(seg, size_hw))
        elif isinstance(seg, dict) and "counts" in seg:
            rle = _checked_rle(seg, size_hw, path, ann)
        else:
            skipped["no_segmentation"] += 1
            continue
        if rle_area(rle) < max(min_area, 1):
            skipped["empty_mask"] += 1
            continue
        masks.append(rle)
        classes.append(name)
    return masks, classes
