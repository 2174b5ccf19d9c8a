"""BSDS500 ``groundTruth/*.mat`` region maps → records.

Each annotator's ``Segmentation`` partitions the image into regions labelled 1..N; every region of at
least ``min_area_frac`` of the image becomes one mask, with the annotator index as its group.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import InputError, require


def read_bsds_mat(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The (H, W) uint16 region maps of every annotator in one .mat file."""
    sio = require("scipy.io", "train")
    gt = sio.loadmat(str(path))["groundTruth"]  # type: ignore[attr-defined]
    return [np.asarray(gt[0, k]["Segmentation"][0, 0]) for k in range(gt.shape[1])]


def read_bsds(root: str | os.PathLike[str], split: str = "train", *, dataset: str = "bsds",
              min_area_frac: float = 0.01, max_annotators: int | None = None,
              limit: int | None = None) -> list[InstanceRecord]:
    base = Path(root)
    gt_dir, img_dir = base / "groundTruth" / split, base / "images" / split
    if not gt_dir.is_dir():
        raise InputError(f"{str(gt_dir)!r} is not a folder; pass the BSDS500 root holding groundTruth/ and images/")
    records = []
    for mat in sorted(gt_dir.glob("*.mat")):
        maps = read_bsds_mat(mat)
        if max_annotators is not None:
            maps = maps[:max_annotators]
        h, w = maps[0].shape
        min_area = max(1, int(min_area_frac * h * w))
        masks, groups = [], []
        for k, seg in enumerate(maps):
            labels, areas = np.unique(seg, return_counts=True)
            for lab, area in zip(labels, areas, strict=True):
                if area >= min_area and area < h * w:
                    masks.append(encode_mask(seg == lab))
                    groups.append(k)
        records.append(InstanceRecord(image_path=str(img_dir / (mat.stem + ".jpg")), size_hw=(h, w), masks=masks,
                                      image_id=mat.stem, dataset=dataset, groups=groups))
        if limit is not None and len(records) >= limit:
            break
    return records
