"""Dataset readers. Every reader returns a list of :class:`InstanceRecord` (image path + COCO RLE masks).

``read_shared`` knows the four datasets of ``../shared/data`` (see its README) and their splits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from segany.data.formats.bsds import read_bsds
from segany.data.formats.coco import read_coco
from segany.data.formats.common import InstanceRecord, ReadReport, decode_rle, encode_mask
from segany.data.formats.png import read_binary_masks, read_instance_pngs, read_object_masks
from segany.data.formats.yolo import read_yolo_seg
from segany.errors import InputError

__all__ = ["InstanceRecord", "ReadReport", "decode_rle", "encode_mask", "read_bsds", "read_coco",
           "read_binary_masks", "read_instance_pngs", "read_object_masks", "read_yolo_seg", "read_shared", "SHARED_DATASETS", "SHARED_DIRS", "held_out_ids"]

SHARED_DATASETS = ("coco128", "pennfudan", "kvasir", "bsds")
# Folder of each shared dataset under the data root (../shared/data/README.md).
SHARED_DIRS = {"coco128": "coco128-seg", "pennfudan": "PennFudanPed", "kvasir": "kvasir-seg", "bsds": "bsds500"}

# Held-out sizes for the datasets that ship without a validation split (README "Suggested use").
HELD_OUT = {"pennfudan": 20, "kvasir": 80}
SPLIT_SEED = 5  # fixed forever: changing it would silently leak training images into evaluation
# Their splits are frozen, id by id, in shared_splits.json: the shipped model trained on those "train" ids and
# every published figure (docs/benchmarks.md) is on those "val" ids. They were made by a seeded shuffle of each
# dataset's whole id list, which moves images across the split whenever a copy of the folder gains or loses
# one; so the shuffle is no longer run, and an id outside both lists goes by its own seeded hash instead.
_FROZEN_SPLITS = Path(__file__).with_name("shared_splits.json")


def _unit_hash(dataset: str, seed: int, image_id: str) -> float:
    """A uniform number in [0, 1) fixed by (dataset, seed, id) alone, whatever other ids exist."""
    digest = hashlib.blake2b(f"{dataset}\0{seed}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def held_out_ids(dataset: str, ids: list[str], *, fraction: float | None = None, seed: int = SPLIT_SEED
                 ) -> list[str]:
    """The deterministic held-out ids of ``dataset`` among ``ids`` (order-independent).

    PennFudan and Kvasir (``fraction`` None) have frozen splits (:func:`frozen_split`; the shipped model's
    training and evaluation depend on them); an id in neither list is held out when its seeded hash falls
    under the frozen held-out share. Any other dataset needs ``fraction`` (0 to < 1): an id is held out
    when its own seeded hash falls under ``fraction``, so adding images never moves an existing image
    across the split (a shuffle of the whole list would leak old val images into train). About
    ``fraction`` of the ids are held out; with two ids or more and fraction > 0, at least one on each side
    (the lowest-hash id when none falls under, the highest-hash one goes back to train when all do).
    """
    if fraction is None:
        if dataset not in HELD_OUT:
            raise InputError(f"dataset {dataset!r} has no fixed held-out split (only {', '.join(HELD_OUT)} do); "
                             "pass a held-out fraction, e.g. fraction=0.1 (segany data pack --val-fraction 0.1)")
        if seed != SPLIT_SEED:
            raise InputError(f"{dataset}'s held-out split is frozen (the shipped model's figures are on it), so it "
                             f"takes no seed (got {seed}); pass a fraction to split it by another seed, e.g. "
                             "fraction=0.15")
        val, train = frozen_split(dataset)
        share = len(val) / (len(val) + len(train))
        return sorted(i for i in set(ids)
                      if i in val or (i not in train and _unit_hash(dataset, SPLIT_SEED, i) < share))
    if not 0 <= fraction < 1:
        raise InputError(f"held-out fraction (--val-fraction) must be in [0, 1), got {fraction}; e.g. 0.1")
    unique = set(ids)
    if fraction == 0 or len(unique) < 2:
        return []
    scored = sorted((_unit_hash(dataset, seed, i), i) for i in unique)
    held = [i for u, i in scored if u < fraction]
    if not held:
        held = [scored[0][1]]
    elif len(held) == len(scored):
        held = held[:-1]
    return sorted(held)


@functools.cache
def frozen_split(dataset: str) -> tuple[frozenset[str], frozenset[str]]:
    """The frozen (held-out, train) ids of a shared dataset without its own validation split."""
    lists = json.loads(_FROZEN_SPLITS.read_text())[dataset]
    return frozenset(lists["val"]), frozenset(lists["train"])


def read_shared(name: str, data_root: str | os.PathLike[str], *, limit: int | None = None
                ) -> dict[str, list[InstanceRecord]]:
    """Read one shared dataset as ``{"train": [...], "val": [...]}``.

    coco128 has no validation split (all train); bsds uses its own train/val; PennFudan and Kvasir hold
    back a fixed seeded subset (20 images, 80 ids).
    """
    root = Path(data_root)
    if name == "coco128":
        return {"train": read_yolo_seg(root / SHARED_DIRS[name], "train2017", dataset=name, min_area=16, limit=limit),
                "val": []}
    if name == "bsds":
        return {"train": read_bsds(root / SHARED_DIRS[name], "train", dataset=name, limit=limit),
                "val": read_bsds(root / SHARED_DIRS[name], "val", dataset=name, limit=limit)}
    if name == "pennfudan":
        base = root / SHARED_DIRS[name]
        recs = read_instance_pngs(base / "PNGImages", base / "PedMasks", dataset=name, limit=limit)
    elif name == "kvasir":
        base = root / SHARED_DIRS[name]
        ids = (base / "train.txt").read_text().split()
        held = set(held_out_ids(name, ids))
        if limit is not None:  # keep some held-out ids in small reads so both splits are exercised
            ids = sorted(held)[: limit // 2] + [i for i in ids if i not in held][: limit - limit // 2]
        recs = read_binary_masks(base / "Kvasir-SEG" / "images", base / "Kvasir-SEG" / "masks", ids=ids,
                                 dataset=name)
    else:
        raise InputError(f"unknown shared dataset {name!r}; choose from {', '.join(SHARED_DATASETS)}")
    if name == "kvasir":
        all_ids = (root / SHARED_DIRS[name] / "train.txt").read_text().split()
    else:  # split over every image on disk, not just the ones read, so `limit` never moves the split
        all_ids = [p.stem for p in (root / SHARED_DIRS[name] / "PNGImages").iterdir() if p.suffix == ".png"]
    held = set(held_out_ids(name, all_ids))
    return {"train": [r for r in recs if r.image_id not in held], "val": [r for r in recs if r.image_id in held]}
