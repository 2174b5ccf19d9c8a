"""Image + mask folders: PNG instance-id maps (PennFudanPed) and binary masks (Kvasir-SEG).

Instance maps: 0 is background, value i ≥ 1 is instance i. Binary masks (which may be lossy JPEGs)
are thresholded at 128 and split into instances by 8-connected components.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import InputError


def _mask_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "LA"):
            im = im.convert("RGB")
            return np.asarray(im)[..., 0]
        return np.asarray(im)


def read_instance_pngs(image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], *,
                       mask_suffix: str = "_mask.png", dataset: str = "pennfudan", min_area: int = 1,
                       limit: int | None = None) -> list[InstanceRecord]:
    """Pair ``image_dir/<name>.*`` with ``mask_dir/<name><mask_suffix>`` holding instance ids."""
    idir, mdir = Path(image_dir), Path(mask_dir)
    if not idir.is_dir() or not mdir.is_dir():
        raise InputError(f"need an image folder and a mask folder, got {str(idir)!r} and {str(mdir)!r}")
    records = []
    for img_path in sorted(p for p in idir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        mpath = mdir / (img_path.stem + mask_suffix)
        if not mpath.exists():
            continue
        ids = _mask_array(mpath)
        masks = []
        for value in np.unique(ids):
            if value == 0:
                continue
            m = ids == value
            if m.sum() >= min_area:
                masks.append(encode_mask(m))
        records.append(InstanceRecord(image_path=str(img_path), size_hw=(ids.shape[0], ids.shape[1]), masks=masks,
                                      image_id=img_path.stem, dataset=dataset))
        if limit is not None and len(records) >= limit:
            break
    return records


def split_components(binary: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """Split a bool mask into its 8-connected components of at least ``min_area`` pixels, largest first."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    comps = [(int(stats[i, cv2.CC_STAT_AREA]), i) for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    return [labels == i for _, i in sorted(comps, reverse=True)]


def read_binary_masks(image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], *,
                      ids: list[str] | None = None, dataset: str = "kvasir", threshold: int = 128,
                      min_area: int = 64, limit: int | None = None) -> list[InstanceRecord]:
    """Pair ``image_dir/<id>.*`` with a same-named binary mask; threshold and split into instances."""
    idir, mdir = Path(image_dir), Path(mask_dir)
    if not idir.is_dir() or not mdir.is_dir():
        raise InputError(f"need an image folder and a mask folder, got {str(idir)!r} and {str(mdir)!r}")
    masks_by_stem = {p.stem: p for p in mdir.iterdir()}
    if ids is None:
        ids = sorted(p.stem for p in idir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    records = []
    for stem in ids:
        img_path = next((idir / (stem + s) for s in (".jpg", ".png", ".jpeg") if (idir / (stem + s)).exists()), None)
        if img_path is None or stem not in masks_by_stem:
            continue
        binary = _mask_array(masks_by_stem[stem]) >= threshold
        masks = [encode_mask(m) for m in split_components(binary, min_area)]
        records.append(InstanceRecord(image_path=str(img_path), size_hw=(binary.shape[0], binary.shape[1]),
                                      masks=masks, image_id=stem, dataset=dataset))
        if limit is not None and len(records) >= limit:
            break
    return records
