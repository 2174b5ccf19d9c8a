"""Image + mask folders: PNG instance-id maps (PennFudanPed), binary masks (Kvasir-SEG), one PNG per object.

Instance maps: 0 is background, value i ≥ 1 is instance i (in a colour map, each colour but black is one
instance). Binary masks (which may be lossy JPEGs) are read as per-object masks are below, 0/1 or thresholded
at 128, and split into instances by 8-connected components. Per-object masks (the
layout for a user's own data, ``segany data pack --masks``) are ``<masks>/<image stem>/<any name>.png``,
one binary PNG per object, the image's size: nonzero (0/1 masks) or ≥ 128 (0/255 masks) is the object.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from segany.data.formats.common import (
    IMAGE_FRAMES,
    InstanceRecord,
    ReadReport,
    encode_mask,
    image_frames_hw,
    note,
)
from segany.errors import InputError


def _open_error(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc}); re-save or remove it")


def _instance_ids(path: Path) -> np.ndarray:
    """An instance map → (H, W) ids, 0 the background.

    One-channel and palette maps hold the id itself (a palette map's index, as PennFudanPed's are, not its
    colour). A colour map holds one colour per instance: the whole colour is the id, since two objects may
    share a channel (red (255, 0, 0) and yellow (255, 255, 0) are two instances, not one); a transparent
    pixel is background.
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F"):
                return np.asarray(im)
            rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
    except (OSError, SyntaxError, ValueError) as exc:
        raise _open_error(path, exc) from exc
    ids = (rgba[..., 0] << 16) | (rgba[..., 1] << 8) | rgba[..., 2]
    ids[rgba[..., 3] < 128] = 0
    return ids


def _mask_fits_image(shape: tuple[int, ...], mpath: Path, img_path: Path, report: ReadReport | None) -> bool:
    """False for an image that cannot be read (it goes to ``report.bad``, or raises without a report); an
    error when the mask is not the image's size, stored or as its EXIF rotation shows it. The record's size
    came from the mask file alone, so a mask of another size trained on a stretched or cut picture."""
    frames = image_frames_hw(img_path, report)
    if frames is None:
        return False
    stored, shown = frames[0], frames[1]
    if tuple(shape[:2]) not in (stored, shown):
        turned = f" (or {shown[0]}x{shown[1]} as its EXIF rotation shows it)" if shown != stored else ""
        raise InputError(f"{mpath} is {shape[0]}x{shape[1]} but its image {img_path} is {stored[0]}x{stored[1]}"
                         f"{turned}; a mask must be its image's size: fix the pairing or re-save the mask")
    return True


def read_instance_pngs(image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], *,
                       mask_suffix: str = "_mask.png", dataset: str = "pennfudan", min_area: int = 1,
                       limit: int | None = None, report: ReadReport | None = None) -> list[InstanceRecord]:
    """Pair ``image_dir/<name>.*`` with ``mask_dir/<name><mask_suffix>`` holding instance ids.

    Images without a mask file are left out and counted in ``report.notes`` (logged without a report).
    """
    idir, mdir = Path(image_dir), Path(mask_dir)
    if not idir.is_dir() or not mdir.is_dir():
        raise InputError(f"need an image folder and a mask folder, got {str(idir)!r} and {str(mdir)!r}")
    records = []
    unmasked: list[str] = []
    for img_path in sorted(p for p in idir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        mpath = mdir / (img_path.stem + mask_suffix)
        if not mpath.exists():
            unmasked.append(img_path.name)
            continue
        ids = _instance_ids(mpath)
        if not _mask_fits_image(ids.shape, mpath, img_path, report):
            continue
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
    if unmasked:
        note(report, f"{idir}: {len(unmasked)} image(s) have no mask {mdir}/<stem>{mask_suffix} "
                     f"(e.g. {unmasked[0]!r}); left out")
    return records


def split_components(binary: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """Split a bool mask into its 8-connected components of at least ``min_area`` pixels, largest first."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    comps = [(int(stats[i, cv2.CC_STAT_AREA]), i) for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    return [labels == i for _, i in sorted(comps, reverse=True)]


def read_binary_masks(image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], *,
                      ids: list[str] | None = None, dataset: str = "kvasir", threshold: int = 128,
                      min_area: int = 64, limit: int | None = None, report: ReadReport | None = None
                      ) -> list[InstanceRecord]:
    """Pair ``image_dir/<id>.*`` with a same-named binary mask; threshold and split into instances.

    A mask is read as :func:`_object_mask` reads one (0/1, 0/255, palette and coloured masks all work);
    ``threshold`` applies to 0-255 masks. Ids without an image or a mask are counted in ``report.notes``.
    """
    idir, mdir = Path(image_dir), Path(mask_dir)
    if not idir.is_dir() or not mdir.is_dir():
        raise InputError(f"need an image folder and a mask folder, got {str(idir)!r} and {str(mdir)!r}")
    masks_by_stem = {p.stem: p for p in mdir.iterdir()}
    if ids is None:
        ids = sorted(p.stem for p in idir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    records = []
    no_image: list[str] = []
    no_mask: list[str] = []
    for stem in ids:
        img_path = next((idir / (stem + s) for s in (".jpg", ".png", ".jpeg") if (idir / (stem + s)).exists()), None)
        if img_path is None or stem not in masks_by_stem:
            (no_image if img_path is None else no_mask).append(stem)
            continue
        try:
            binary = _object_mask(masks_by_stem[stem], threshold)
        except (OSError, SyntaxError, ValueError) as exc:
            raise _open_error(masks_by_stem[stem], exc) from exc
        if not _mask_fits_image(binary.shape, masks_by_stem[stem], img_path, report):
            continue
        masks = [encode_mask(m) for m in split_components(binary, min_area)]
        records.append(InstanceRecord(image_path=str(img_path), size_hw=(binary.shape[0], binary.shape[1]),
                                      masks=masks, image_id=stem, dataset=dataset))
        if limit is not None and len(records) >= limit:
            break
    if no_mask:
        note(report, f"{idir}: {len(no_mask)} image(s) have no same-named mask in {mdir} (e.g. {no_mask[0]!r}); "
                     "left out")
    if no_image:
        note(report, f"{idir}: {len(no_image)} id(s) have no image <id>.jpg/.png/.jpeg (e.g. {no_image[0]!r}); "
                     "left out")
    return records


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _object_mask(path: Path, threshold: int = 128) -> np.ndarray:
    """One mask file → (H, W) bool; 0/1 and 0/255 masks both work, in any colour.

    Any colour channel at ``threshold`` counts (a mask drawn in green is as much an object as one drawn in
    white); a transparent pixel is background. A mask whose colour is black everywhere but whose alpha
    varies (some editors export the object as opaque black) is its opaque part. A lossless mask whose
    values are all 0 or 1 is a 0/1 mask; a JPEG's always takes the threshold, since its compression noise
    leaves 1s in a background.
    """
    with Image.open(path) as im:
        lossy = im.format == "JPEG"
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        if im.mode == "RGB":  # no alpha to read: skip the RGBA copy (a large JPEG mask reads 5x faster)
            arr, alpha = np.asarray(im), None
        elif im.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "HSV"):
            arr = np.asarray(im.convert("RGBA"))
            arr, alpha = arr[..., :3], arr[..., 3]
        else:  # "1", "L", "I", "I;16", "F": one channel
            arr, alpha = np.asarray(im), None
    # The brightest channel; pairwise maximum, as numpy's max over a last axis of 3 is ~10x slower.
    colour = np.maximum(np.maximum(arr[..., 0], arr[..., 1]), arr[..., 2]) if arr.ndim == 3 else arr
    obj = colour >= (threshold if lossy or colour.max(initial=0) > 1 else 1)
    if has_alpha and alpha is not None:
        opaque = alpha >= 128
        obj = (obj & opaque) if obj.any() else opaque & (alpha.min(initial=0) < 128)
    return obj


def _read_object_folder(folder: Path, img_path: Path, frames_hw: tuple[tuple[int, int], ...],
                        report: ReadReport | None) -> tuple[list[dict], tuple[int, int]]:
    """The folder's masks and their common size, which is one of ``frames_hw`` (the image's stored size,
    or its size shown after the EXIF rotation)."""
    masks = []
    empty = 0
    size_hw = frames_hw[0]
    sizes: set[tuple[int, int]] = set()
    for mpath in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png"):
        try:
            m = _object_mask(mpath)
        except OSError as exc:
            raise InputError(f"{mpath}: not a readable PNG ({exc.__class__.__name__}); re-save or remove it") from exc
        if m.shape not in frames_hw:
            shown = f" (or {frames_hw[1][0]}x{frames_hw[1][1]} as its EXIF rotation shows it)" \
                if frames_hw[1] != frames_hw[0] else ""
            raise InputError(f"{mpath} is {m.shape[0]}x{m.shape[1]} but its image {img_path} is "
                             f"{frames_hw[0][0]}x{frames_hw[0][1]}{shown}; each object mask must be the image's size")
        sizes.add((int(m.shape[0]), int(m.shape[1])))
        size_hw = (int(m.shape[0]), int(m.shape[1]))
        if not m.any():
            empty += 1
            continue
        masks.append(encode_mask(m))
    if len(sizes) > 1:
        raise InputError(f"{folder}: some masks are {' and some '.join('x'.join(map(str, s)) for s in sorted(sizes))}"
                         f"; the image {img_path} is one of them turned by its EXIF rotation: save every mask "
                         "in one frame")
    if empty:
        note(report, f"{folder}: {empty} mask file(s) are all background; left out")
    return masks, size_hw


def _images_by_stem(idir: Path, wanted: set[str]) -> dict[str, Path]:
    """Images of ``idir`` by stem; two files with one stem (a.jpg and a.png) that has a mask folder are
    refused, since either could be the picture its masks were drawn on."""
    images: dict[str, Path] = {}
    for p in sorted(idir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in images and p.stem in wanted:
            raise InputError(f"{images[p.stem]} and {p} share the name {p.stem!r}, so the masks in {p.stem}/ could "
                             "belong to either; rename or move one of them")
        images.setdefault(p.stem, p)
    return images


def read_object_masks(image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], *,
                      dataset: str = "own", report: ReadReport | None = None) -> list[InstanceRecord]:
    """Images of ``image_dir`` with their per-object masks ``mask_dir/<image stem>/*.png`` (one object each).

    Images without a mask folder and mask folders without an image are counted in ``report.notes``;
    unreadable images go to ``report.bad`` (or raise without a report). Each record carries the frames read
    from its image's header in ``extra[IMAGE_FRAMES]``, so packing does not open the image a second time.
    """
    idir, mdir = Path(image_dir), Path(mask_dir)
    for flag, d in (("--images", idir), ("--masks", mdir)):
        if not d.is_dir():
            raise InputError(f"{flag} {str(d)!r} is not a folder; pass --images DIR (the images) and --masks DIR "
                             "holding one folder per image, <image stem>/<object>.png")
    folders = {p.name: p for p in mdir.iterdir() if p.is_dir()}
    images = _images_by_stem(idir, set(folders))
    records = []
    for stem, img_path in sorted(images.items()):
        if stem not in folders:
            continue
        frames = image_frames_hw(img_path, report)
        if frames is None:
            continue
        masks, size_hw = _read_object_folder(folders[stem], img_path, (frames[0], frames[1]), report)
        records.append(InstanceRecord(image_path=str(img_path), size_hw=size_hw, masks=masks, image_id=stem,
                                      dataset=dataset, extra={IMAGE_FRAMES: frames}))
    if without := len(set(images) - set(folders)):
        note(report, f"{idir}: {without} image(s) have no mask folder {mdir}/<stem>/; left out")
    if orphans := sorted(set(folders) - set(images)):
        note(report, f"{mdir}: {len(orphans)} mask folder(s) have no image in {idir} (e.g. {orphans[0]!r}); left out")
    return records
