"""Image + mask folders: PNG instance-id maps (PennFudanPed), binary masks (Kvasir-SEG), one PNG per object.

Instance maps: 0 is background, value i ≥ 1 is instance i. Binary masks (which may be lossy JPEGs)
are thresholded at 128 and split into instances by 8-connected components. Per-object masks (the
layout for a user's own data, ``segany data pack --masks``) are ``<masks>/<image stem>/<any name>.png``,
one binary PNG per object, the image's size: nonzero (0/1 masks) or ≥ 128 (0/255 masks) is the object.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from segany.data.formats.common import InstanceRecord, ReadReport, encode_mask, image_size_hw, note
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _object_mask(path: Path) -> np.ndarray:
    """One per-object mask file → (H, W) bool; 0/1 and 0/255 masks both work."""
    values = _mask_array(path)
    if values.ndim == 3:  # grey + alpha and the like: the first channel carries the mask
        values = values[..., 0]
    return values >= (128 if values.max(initial=0) > 1 else 1)


def _read_object_folder(folder: Path, img_path: Path, size_hw: tuple[int, int], report: ReadReport | None
                        ) -> list[dict]:
    masks = []
    empty = 0
    for mpath in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png"):
        try:
            m = _object_mask(mpath)
        except OSError as exc:
            raise InputError(f"{mpath}: not a readable PNG ({exc.__class__.__name__}); re-save or remove it") from exc
        if m.shape != size_hw:
            raise InputError(f"{mpath} is {m.shape[0]}x{m.shape[1]} but its image {img_path} is "
                             f"{size_hw[0]}x{size_hw[1]}; each object mask must be the image's size")
        if not m.any():
            empty += 1
            continue
        masks.append(encode_mask(m))
    if empty:
        note(report, f"{folder}: {empty} mask file(s) are all background; left out")
    return masks


def read_object_masks(image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], *,
                      dataset: str = "own", report: ReadReport | None = None) -> list[InstanceRecord]:
    """Images of ``image_dir`` with their per-object masks ``mask_dir/<image stem>/*.png`` (one object each).

    Images without a mask folder and mask folders without an image are counted in ``report.notes``;
    unreadable images go to ``report.bad`` (or raise without a report).
    """
    idir, mdir = Path(image_dir), Path(mask_dir)
    for flag, d in (("--images", idir), ("--masks", mdir)):
        if not d.is_dir():
            raise InputError(f"{flag} {str(d)!r} is not a folder; pass --images DIR (the images) and --masks DIR "
                             "holding one folder per image, <image stem>/<object>.png")
    images = {p.stem: p for p in sorted(idir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    folders = {p.name: p for p in mdir.iterdir() if p.is_dir()}
    records = []
    for stem, img_path in sorted(images.items()):
        if stem not in folders:
            continue
        size_hw = image_size_hw(img_path, report)
        if size_hw is None:
            continue
        masks = _read_object_folder(folders[stem], img_path, size_hw, report)
        records.append(InstanceRecord(image_path=str(img_path), size_hw=size_hw, masks=masks, image_id=stem,
                                      dataset=dataset))
    if without := len(set(images) - set(folders)):
        note(report, f"{idir}: {without} image(s) have no mask folder {mdir}/<stem>/; left out")
    if orphans := sorted(set(folders) - set(images)):
        note(report, f"{mdir}: {len(orphans)} mask folder(s) have no image in {idir} (e.g. {orphans[0]!r}); left out")
    return records
