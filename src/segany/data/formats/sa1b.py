"""SA-1B annotation files: one JSON per image (Kirillov et al. 2023, SA-1B dataset card).

``{"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation, bbox, area,
predicted_iou, stability_score, crop_box, point_coords}, ...]}``, where ``segmentation`` is a COCO
RLE whose ``counts`` is a str and ``bbox``/``crop_box`` are XYWH pixels.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segany.atomic import atomic_write_text
from segany.data.formats.auto_files import BOOKKEEPING, is_run_record
from segany.data.formats.common import (
    IMAGE_FRAMES,
    ImageFrames,
    InstanceRecord,
    ReadReport,
    _string_to_counts,
    decode_rle,
    encode_mask,
    image_frames_hw,
    note,
    runs_area,
)
from segany.data.rle import coco_to_mask, mask_to_coco
from segany.errors import ImageLoadError, InputError

_ANN_KEYS = ("id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "crop_box", "point_coords")


@dataclass
class Sa1bImage:
    image_id: int
    width: int
    height: int
    file_name: str
    annotations: list[dict[str, Any]] = field(default_factory=list)
    # Pixels of each annotation's mask, counted when its counts were checked: a reader that needs them (to
    # leave empty masks out) parses no RLE twice, and need not trust the file's own "area" field.
    areas: list[int] = field(default_factory=list)

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
    """Write an SA-1B dict atomically (temp file in the same folder, then ``os.replace``).

    The file is strict JSON, as SA-1B's are: a NaN or infinite number anywhere is refused and nothing is
    written. The generator gives an empty mask (kept with ``stability_score_thresh=0``) a NaN stability
    (0/0, as the reference does); drop such masks first, as ``segany auto`` does.

    Raises:
        InputError: a number in ``data`` is NaN or infinite (the message names where).
    """
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        where = _nonfinite_field(data)
        if where is None:
            raise
        raise InputError(f"SA-1B file {str(path)!r} not written: {where} is not a finite number, and SA-1B files are "
                         "strict JSON (no NaN or Infinity); drop the masks whose scores are not finite first, e.g. "
                         "[a for a in anns if math.isfinite(a['stability_score'])] (an empty mask's stability is "
                         "0/0)") from exc
    return atomic_write_text(path, text, fsync=True)  # resumed runs trust a present file as complete


def _nonfinite_field(value: Any, where: str = "") -> str | None:
    """Where the first NaN or infinite float in ``value`` is (``annotation 3 (id 7) stability_score = nan``)."""
    if isinstance(value, float):
        return f"{where} = {value}" if not math.isfinite(value) else None
    if isinstance(value, dict):
        if where == "" and isinstance(value.get("annotations"), list):  # name annotations by index and id
            for i, ann in enumerate(value["annotations"]):
                label = f"annotation {i}" + (f" (id {ann['id']!r})" if isinstance(ann, dict) and "id" in ann else "")
                found = _nonfinite_field(ann, label + " ")
                if found is not None:
                    return found
            value = {k: v for k, v in value.items() if k != "annotations"}
        for k, v in value.items():
            found = _nonfinite_field(v, f"{where}{k}" if where.endswith(" ") or not where else f"{where}.{k}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _nonfinite_field(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _run_lengths(counts: Any) -> list[int]:
    """The run lengths of RLE ``counts`` (a COCO counts str, or a list of run lengths); ValueError when malformed."""
    if isinstance(counts, (str, bytes)):
        return _string_to_counts(counts)
    if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        if any(c < 0 for c in counts):
            raise ValueError("a run length is negative")
        return counts
    raise ValueError(f"counts is a {type(counts).__name__}, not a COCO counts string")


def _check_segmentation(a: dict[str, Any], where: str, size_hw: list[int]) -> int:
    """Refuse a damaged mask when the file is read: decoded later (``masks()``, a pack, an eval), it would fail
    far from the file it came from, or (counts that are too short) decode to a wrong mask without a word.

    Returns the mask's area in pixels, from the run lengths parsed for the check, so no caller parses the
    counts again to count them.
    """
    seg = a["segmentation"]
    h, w = size_hw
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        got = "a polygon list" if isinstance(seg, list) else f"a {type(seg).__name__}"
        raise InputError(f"{where}: segmentation is {got}; SA-1B masks are RLEs, {{\"size\": [h, w], \"counts\": "
                         "str}: convert it (pycocotools.mask.encode) or re-export the file")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)) or size != [h, w]:
        raise InputError(f"{where}: segmentation size is {size!r} but the image is {h}x{w}; each mask must be "
                         "the image's size [height, width]: re-export the mask or fix the image's height/width")
    try:
        runs = _run_lengths(seg["counts"])
    except ValueError as exc:
        raise InputError(f"{where}: segmentation counts are corrupt ({exc}); the file may be cut off or "
                         "hand-edited: regenerate it") from exc
    total = sum(runs)
    if total != h * w:
        raise InputError(f"{where}: segmentation counts cover {total} pixels but its size {h}x{w} has {h * w}; "
                         "the mask is corrupt: regenerate the file")
    return runs_area(runs)


def read_sa1b(path: str | os.PathLike[str]) -> Sa1bImage:
    """Read and check one SA-1B JSON file, masks included (damaged ones are refused with the annotation's id)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.json"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise InputError(f"SA-1B file {str(p)!r} is a folder{hint}; pass one per-image .json file")
    return _sa1b_image(_load_json(p), p)


def _load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"SA-1B file {str(p)!r} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(p)!r} is not valid JSON ({exc}); the file may be truncated: regenerate it") from exc


def _sa1b_image(data: Any, p: Path) -> Sa1bImage:
    """The checked :class:`Sa1bImage` of one file's parsed JSON ``data`` (``p`` names it in messages)."""
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise InputError(f"{str(p)!r} is not an SA-1B file: expected keys 'image' and 'annotations'")
    im, anns = data["image"], data["annotations"]
    if not isinstance(im, dict) or not isinstance(anns, list):
        raise InputError(f"{str(p)!r} is not an SA-1B file: 'image' must be an object and 'annotations' a list")
    missing = [k for k in ("image_id", "width", "height", "file_name") if k not in im]
    if missing:
        raise InputError(f"{str(p)!r}: 'image' lacks {', '.join(missing)}")
    if not all(isinstance(im[k], int) and im[k] > 0 for k in ("width", "height")):
        raise InputError(f"{str(p)!r}: image width/height are {im['width']!r}/{im['height']!r}; they must be "
                         "positive whole numbers of pixels")
    areas = []
    for j, a in enumerate(anns):
        if not isinstance(a, dict):
            raise InputError(f"{str(p)!r}: annotation {j} is a {type(a).__name__}, not an object")
        where = f"{str(p)!r}: annotation {j}" + (f" (id {a['id']!r})" if "id" in a else "")
        lacks = [k for k in _ANN_KEYS if k not in a]
        if lacks:
            raise InputError(f"{where} lacks {', '.join(lacks)}")
        areas.append(_check_segmentation(a, where, [im["height"], im["width"]]))
    try:
        image_id = int(im["image_id"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{str(p)!r}: image_id is {im['image_id']!r}; SA-1B image ids are whole numbers") from exc
    return Sa1bImage(image_id, int(im["width"]), int(im["height"]), str(im["file_name"]), list(anns), areas)


# ----------------------------------------------------------------------------- a folder of them, for packing


def is_sa1b_data(data: Any) -> bool:
    """Whether parsed JSON has SA-1B's shape: one image's ``image`` object and its ``annotations`` list."""
    return (isinstance(data, dict) and isinstance(data.get("image"), dict)
            and isinstance(data.get("annotations"), list) and "images" not in data)


def _is_coco_data(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def sa1b_json_files(source: str | os.PathLike[str]) -> list[Path]:
    """The per-image SA-1B files under ``source`` (a folder, searched recursively; or one .json file), sorted.

    Hidden paths and the bookkeeping files of ``segany auto`` are left out: at the folder's top and in any
    folder that holds an auto run record (several runs' outputs under one folder); elsewhere ``sub/run.json``
    is the masks of ``sub/run.jpg``, which a skip at any depth lost.
    """
    src = Path(source)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise InputError(f"--sa1b {str(src)!r} does not exist; pass the folder of SA-1B .json files (one per image, "
                         "as SA-1B ships them and `segany auto IMAGES --out DIR` writes them)")
    records: dict[Path, bool] = {}  # folder -> whether it is an auto output (its run.json records a run)

    def bookkeeping(p: Path) -> bool:
        if p.name not in BOOKKEEPING:
            return False
        if p.parent not in records:
            records[p.parent] = p.parent == src or is_run_record(p.parent)
        return records[p.parent]

    return [p for p in sorted(src.rglob("*.json"))
            if not bookkeeping(p) and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(src).parts)]


def looks_like_sa1b(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an SA-1B file, or a folder whose first .json file is one (for refusing --coco on it)."""
    p = Path(path)
    try:
        files = sa1b_json_files(p)
        return bool(files) and is_sa1b_data(json.loads(files[0].read_text(encoding="utf-8")))
    except (OSError, ValueError, InputError):
        return False


def read_sa1b_folder(source: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *,
                     dataset: str = "sa1b", report: ReadReport | None = None) -> list[InstanceRecord]:
    """Records of a folder of per-image SA-1B files (SA-1B itself, or what ``segany auto`` wrote).

    Each file's image is ``image_root / file_name`` (``segany auto`` names it relative to the folder it read,
    so pass that folder); without ``image_root`` it is the file of that name beside the JSON, as SA-1B ships
    (``sa_1.jpg`` beside ``sa_1.json``). An image's id is its JSON's path under ``source`` without ``.json``,
    unique by construction (SA-1B's numeric ids need not be, across two ``segany auto`` runs). Masks are on
    the picture as shown, EXIF rotation applied, as ``segany auto`` and SAM's own scripts read images.
    Images are not checked here (a missing one is still a record): packing lists every unusable image
    at once, a missing file or a size that is not the file's (:func:`segany.data.pack.pack_own`). It does so
    from the header read here for the EXIF tag, left in ``extra[IMAGE_FRAMES]``, so no image is opened twice.
    Masks of no pixels are counted in ``report.skipped`` (``empty_mask``) and left out. A JSON file that is
    not an SA-1B file is refused, naming it.
    """
    src = Path(source)
    files = sa1b_json_files(src)
    if not files:
        raise InputError(f"no .json files in {str(src)!r}; --sa1b takes a folder of per-image SA-1B files (SA-1B's "
                         "sa_*.json, or the --out folder of `segany auto`, whose default --format is sa1b)")
    base = src if src.is_dir() else src.parent
    records = []
    empty = 0
    for p in files:
        data = _load_json(p)
        if not is_sa1b_data(data):
            if _is_coco_data(data):
                raise InputError(f"{p} is a COCO instances file (an 'images' list), not a per-image SA-1B file; "
                                 f"pack it with --coco {p} (and --images DIR), and keep it out of the --sa1b folder")
            raise InputError(f"{p} is not an SA-1B file (expected 'image' and 'annotations', one image per file); "
                             "every .json under --sa1b must be one: move it out of the folder")
        im = _sa1b_image(data, p)
        file = (Path(image_root) / im.file_name) if image_root is not None else p.parent / Path(im.file_name).name
        frames = _frames_or_reason(file)
        orientation = frames[2] if not isinstance(frames, str) else 1
        h, w = im.height, im.width
        masks = []
        for a, area in zip(im.annotations, im.areas, strict=True):
            if area < 1:
                empty += 1
                continue
            seg = a["segmentation"]
            masks.append({"size": [h, w], "counts": seg["counts"]} if isinstance(seg["counts"], str)
                         else encode_mask(decode_rle(seg)))
        extra: dict[str, Any] = {IMAGE_FRAMES: frames}
        if orientation != 1:
            extra["exif_frame"] = "shown"
        records.append(InstanceRecord(image_path=str(file), size_hw=(h, w), masks=masks,
                                      image_id=p.relative_to(base).with_suffix("").as_posix(), dataset=dataset,
                                      extra=extra))
    if empty:
        note(report, f"{src}: {empty} annotation(s) have a mask of no pixels; left out")
        if report is not None:
            report.skipped["empty_mask"] += empty
    return records


def _frames_or_reason(file: Path) -> ImageFrames | str:
    """The image's frames from its header, or the line saying why it cannot be read: a missing or unreadable
    image is still a record here, and packing lists it with every other unusable image."""
    try:
        return image_frames_hw(file, None)  # type: ignore[return-value]  # None raises instead of returning None
    except ImageLoadError as exc:
        return str(exc)
