"""BSDS500 ``groundTruth/*.mat`` region maps → records.

Each annotator's ``Segmentation`` partitions the image into regions labelled 1..N; every region of at
least ``min_area_frac`` of the image becomes one mask, with the annotator index as its group.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segany.data.formats.common import InstanceRecord, ReadReport, bad_image, encode_mask, image_size_hw
from segany.errors import InputError, require


def read_bsds_mat(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The (H, W) region maps of every annotator in one .mat file (uint16 in BSDS500 itself).

    Raises :class:`InputError` naming the file when it is not a readable BSDS500 ground-truth file.
    """
    sio = require("scipy.io", "train")
    try:
        mat = sio.loadmat(str(path))  # type: ignore[attr-defined]
    except Exception as exc:  # a damaged file raises MatReadError, OSError, IndexError, zlib.error, ...
        raise InputError(f"{path}: not a readable MATLAB .mat file ({exc.__class__.__name__}: {exc}); the file may be "
                         "damaged or cut off: download or copy it again") from exc
    if "groundTruth" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise InputError(f"{path}: has no 'groundTruth' variable (it has {keys}); BSDS500 ground truth files hold "
                         "groundTruth{k}.Segmentation: pass the groundTruth/<split>/*.mat files of BSDS500")
    gt = mat["groundTruth"]
    try:
        maps = [np.asarray(gt[0, k]["Segmentation"][0, 0]) for k in range(gt.shape[1])]
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: groundTruth is not a 1xK cell of structs with a 'Segmentation' field "
                         f"({exc.__class__.__name__}: {exc}); pass a BSDS500 ground truth file") from exc
    if not maps:
        raise InputError(f"{path}: groundTruth holds no segmentation; pass a BSDS500 ground truth file")
    for k, seg in enumerate(maps):
        if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
            raise InputError(f"{path}: segmentation {k} is {seg.dtype} of shape {seg.shape}, not an (H, W) map of "
                             "region labels; pass a BSDS500 ground truth file")
        if seg.shape != maps[0].shape:
            raise InputError(f"{path}: segmentation {k} is {seg.shape[0]}x{seg.shape[1]} but segmentation 0 is "
                             f"{maps[0].shape[0]}x{maps[0].shape[1]}; every annotator's map must be the image's size")
    return maps


def read_bsds(root: str | os.PathLike[str], split: str = "train", *, dataset: str = "bsds",
              min_area_frac: float = 0.01, max_annotators: int | None = None,
              limit: int | None = None, report: ReadReport | None = None) -> list[InstanceRecord]:
    """Read one split of BSDS500: ``groundTruth/<split>/<id>.mat`` beside ``images/<split>/<id>.jpg``.

    A .mat whose image is missing, unreadable or of another size goes to ``report.bad`` (or raises without
    a report) rather than becoming a record that points at nothing or at a picture the masks do not fit.
    """
    base = Path(root)
    gt_dir, img_dir = base / "groundTruth" / split, base / "images" / split
    if not gt_dir.is_dir():
        raise InputError(f"{str(gt_dir)!r} is not a folder; pass the BSDS500 root holding groundTruth/ and images/")
    if max_annotators is not None and max_annotators < 1:
        raise InputError(f"max_annotators is {max_annotators}; pass 1 or more (or None for every annotator)")
    records = []
    for mat in sorted(gt_dir.glob("*.mat")):
        img_path = img_dir / (mat.stem + ".jpg")
        image_hw = image_size_hw(img_path, report)
        if image_hw is None:
            continue
        maps = read_bsds_mat(mat)
        if max_annotators is not None:
            maps = maps[:max_annotators]
        h, w = maps[0].shape
        if image_hw != (h, w):
            bad_image(report, f"{img_path}: is {image_hw[0]}x{image_hw[1]} but its region maps in {mat} are {h}x{w}; "
                              "the masks would not fit the picture: pair each .mat with its own image")
            continue
        min_area = max(1, int(min_area_frac * h * w))
        masks, groups = [], []
        for k, seg in enumerate(maps):
            labels, areas = np.unique(seg, return_counts=True)
            for lab, area in zip(labels, areas, strict=True):
                if area >= min_area and area < h * w:
                    masks.append(encode_mask(seg == lab))
                    groups.append(k)
        records.append(InstanceRecord(image_path=str(img_path), size_hw=(h, w), masks=masks,
                                      image_id=mat.stem, dataset=dataset, groups=groups))
        if limit is not None and len(records) >= limit:
            break
    return records
