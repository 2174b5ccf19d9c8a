"""Pack datasets into one small self-contained folder that travels to a training machine.

Layout::

    <out>/manifest.json.gz     gzipped JSON {"format": "segany-pack-v1", "max_side": 512, "records": [...], "splits": {...}}
    <out>/images/<dataset>/<image_id>.jpg

Images are resized so their long side is at most ``max_side`` (JPEG, quality ``quality``); masks are
resized to the same grid and stored as COCO RLE in the manifest. Each record carries its split
("train" or "val"), so evaluation uses exactly the held-out images. Reading a pack needs neither
pycocotools nor scipy.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segany.atomic import atomic_path, atomic_write, atomic_write_json
from segany.data.formats.common import InstanceRecord, decode_rle, encode_mask
from segany.errors import InputError
from segany.transforms import preprocess_shape

log = logging.getLogger(__name__)

PACK_FORMAT = "segany-pack-v1"


def _resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    import cv2

    if mask.shape == size_hw:
        return mask
    # Area-average then threshold: thin parts survive better than with nearest neighbour.
    small = cv2.resize(mask.astype(np.float32), (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)
    return small >= 0.5


SETTINGS_FILE = ".pack_settings.json"  # what the images were written with; a rerun that matches resumes


def _check_settings(max_side: int, quality: int, max_side_by_dataset: dict[str, int] | None) -> None:
    for name, side in [("max_side (--max-side)", max_side), *((f"max side of {k}", v) for k, v in
                                                              (max_side_by_dataset or {}).items())]:
        if not isinstance(side, int) or side < 32:
            raise InputError(f"{name} must be a whole number of pixels >= 32, got {side!r}; e.g. 512")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"quality (--quality) is a JPEG quality from 1 to 100, got {quality!r}; e.g. 80")


def _save_jpeg_atomic(image: Image.Image, path: Path, quality: int) -> None:
    # Whole or absent: a rerun after Ctrl-C trusts every image it finds.
    atomic_write(path, lambda f: image.save(f, format="JPEG", quality=quality))


def pack_records(records: Iterable[tuple[str, InstanceRecord]], out_dir: str | os.PathLike[str], *,
                 max_side: int = 512, quality: int = 80, min_area: int = 16,
                 max_side_by_dataset: dict[str, int] | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write (split, record) pairs into a pack folder; returns the manifest.

    Resumable: images are written atomically, and a rerun into the same folder with the same ``max_side``
    and ``quality`` keeps the images already there (the manifest is rebuilt; masks come from the sources).
    With other settings every image is written again. The returned dict also says how many were ``reused``
    (that key is not in the manifest file).
    """
    from segany.data.images import load_image

    _check_settings(max_side, quality, max_side_by_dataset)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"pack output {str(out)!r} is an existing file; pass a folder (--out DIR)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    settings = {"format": PACK_FORMAT, "max_side": max_side, "quality": quality,
                "max_side_by_dataset": dict(sorted((max_side_by_dataset or {}).items()))}
    settings_path = out / SETTINGS_FILE
    try:
        resume = json.loads(settings_path.read_text()) == settings
    except (OSError, ValueError):
        resume = False
    if not resume:
        atomic_write_json(settings_path, settings)
    packed: list[dict[str, Any]] = []
    reused = 0
    for split, rec in records:
        h, w = rec.size_hw
        side = (max_side_by_dataset or {}).get(rec.dataset, max_side)
        nh, nw = preprocess_shape(h, w, side) if max(h, w) > side else (h, w)
        rel = Path("images") / rec.dataset / f"{rec.image_id}.jpg"
        if resume and (out / rel).is_file():
            reused += 1
        else:
            image = load_image(rec.image_path)
            if image.shape[:2] != tuple(rec.size_hw):
                raise InputError(f"{rec.image_path}: image is {image.shape[0]}x{image.shape[1]} but its masks are "
                                 f"{rec.size_hw}")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            _save_jpeg_atomic(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), out / rel, quality)
        masks, classes, groups = [], [], []
        for i, rle in enumerate(rec.masks):
            m = _resize_mask(decode_rle(rle), (nh, nw))
            if m.sum() < min_area:
                continue
            masks.append(encode_mask(m))
            if rec.class_names is not None:
                classes.append(rec.class_names[i])
            if rec.groups is not None:
                groups.append(rec.groups[i])
        d = InstanceRecord(image_path=rel.as_posix(), size_hw=(nh, nw), masks=masks,
                           class_names=classes if rec.class_names is not None else None,
                           image_id=rec.image_id, dataset=rec.dataset,
                           groups=groups if rec.groups is not None else None).to_dict()
        d["split"] = split
        packed.append(d)
        if progress:
            progress(1)
    manifest = {"format": PACK_FORMAT, "max_side": max_side, "records": packed,
                "splits": _split_summary(packed)}
    with atomic_path(out / "manifest.json.gz") as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(manifest, f, separators=(",", ":"))  # RLE strings gzip to about a third
    return {**manifest, "reused": reused}


def _split_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    summary: dict[str, dict[str, list[str]]] = {}
    for r in records:
        summary.setdefault(r["dataset"], {"train": [], "val": []})[r["split"]].append(r["image_id"])
    return summary


def pack_shared(data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                datasets: Iterable[str] = ("coco128", "pennfudan", "kvasir", "bsds"), max_side: int = 512,
                quality: int = 80, max_side_by_dataset: dict[str, int] | None = None, bsds_annotators: int = 3, limit: int | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Pack the shared datasets (``../shared/data``) with their train/held-out splits."""
    from segany.data.formats import SHARED_DATASETS, SHARED_DIRS, read_shared

    datasets = list(datasets)
    if limit is not None and limit < 1:
        raise InputError(f"limit (--limit) must be at least 1 image per dataset, got {limit}")
    if max_side_by_dataset is None:
        # Kvasir is 60% of the images; its smooth endoscopy frames lose little at 384 px, and that keeps
        # the whole pack under the 45 MB that can travel to a GPU machine.
        max_side_by_dataset = {"kvasir": min(384, max_side)} if isinstance(max_side, int) else {}
    _check_settings(max_side, quality, max_side_by_dataset)
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"data folder {str(root)!r} does not exist; pass the shared data folder (--data DIR) "
                         f"holding {', '.join(f'{d}/' for d in SHARED_DIRS.values())}")
    if not datasets:
        raise InputError(f"no datasets to pack; name some of {', '.join(SHARED_DATASETS)} (--datasets)")
    for name in datasets:
        if name not in SHARED_DIRS:
            raise InputError(f"unknown dataset {name!r} (--datasets); choose from {', '.join(SHARED_DATASETS)}")
        if not (root / SHARED_DIRS[name]).is_dir():
            raise InputError(f"{name}: {str(root / SHARED_DIRS[name])!r} not found; pass the shared data folder "
                             f"(--data DIR) or leave {name} out of --datasets")
    pairs: list[tuple[str, InstanceRecord]] = []
    for name in datasets:
        splits = read_shared(name, data_root, limit=limit)
        for split, recs in splits.items():
            for r in recs:
                if name == "bsds" and r.groups is not None:  # keep a few annotators: the pack must stay small
                    keep = [i for i, g in enumerate(r.groups) if g < bsds_annotators]
                    r.masks = [r.masks[i] for i in keep]
                    r.groups = [r.groups[i] for i in keep]
                pairs.append((split, r))
    log.info("packing %d images", len(pairs))
    return pack_records(pairs, out_dir, max_side=max_side, quality=quality, progress=progress,
                        max_side_by_dataset=max_side_by_dataset)


def load_pack(pack_dir: str | os.PathLike[str], split: str | None = None, datasets: Iterable[str] | None = None
              ) -> list[InstanceRecord]:
    """Records of a pack (optionally one split and some datasets), image paths made absolute."""
    root = Path(pack_dir)
    path = root / "manifest.json.gz"
    if not path.exists():
        raise InputError(f"{str(root)!r} is not a segany pack (no manifest.json.gz); create one with "
                         "`segany data pack --out DIR` or scripts/pack_data.py")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != PACK_FORMAT:
        raise InputError(f"{str(path)!r} has format {manifest.get('format')!r}, expected {PACK_FORMAT!r}")
    wanted = set(datasets) if datasets is not None else None
    out = []
    for d in manifest["records"]:
        if split is not None and d["split"] != split:
            continue
        if wanted is not None and d["dataset"] not in wanted:
            continue
        out.append(InstanceRecord.from_dict(d, root))
    return out
