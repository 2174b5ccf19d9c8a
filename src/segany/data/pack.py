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


def pack_records(records: Iterable[tuple[str, InstanceRecord]], out_dir: str | os.PathLike[str], *,
                 max_side: int = 512, quality: int = 80, min_area: int = 16,
                 max_side_by_dataset: dict[str, int] | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write (split, record) pairs into a pack folder; returns the manifest."""
    from segany.data.images import load_image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    packed: list[dict[str, Any]] = []
    for split, rec in records:
        image = load_image(rec.image_path)
        h, w = image.shape[:2]
        if (h, w) != tuple(rec.size_hw):
            raise InputError(f"{rec.image_path}: image is {h}x{w} but its masks are {rec.size_hw}")
        side = (max_side_by_dataset or {}).get(rec.dataset, max_side)
        nh, nw = preprocess_shape(h, w, side) if max(h, w) > side else (h, w)
        rel = Path("images") / rec.dataset / f"{rec.image_id}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((nw, nh), Image.BILINEAR).save(out / rel, quality=quality)
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
    tmp = out / ".manifest.json.gz.tmp"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:  # RLE strings gzip to about a third
        json.dump(manifest, f, separators=(",", ":"))
    os.replace(tmp, out / "manifest.json.gz")
    return manifest


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
    from segany.data.formats import read_shared

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
    if max_side_by_dataset is None:
        # Kvasir is 60% of the images; its smooth endoscopy frames lose little at 384 px, and that keeps
        # the whole pack under the 45 MB that can travel to a GPU machine.
        max_side_by_dataset = {"kvasir": min(384, max_side)}
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
