"""The record every dataset reader returns, and a dependency-free COCO RLE codec.

A record is one image: its path, its size, and its instance masks as COCO run-length encodings
(``{"size": [H, W], "counts": str}``, column-major, the format of COCO and SA-1B). The codec is written
here in numpy so training and evaluation run where pycocotools is not installed (GPU machines);
pycocotools is used for speed when present.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segany.errors import InputError

RLE = dict[str, Any]


@dataclass
class InstanceRecord:
    """One image and its instance masks.

    Attributes:
        image_path: file of the image (any format :func:`segany.data.images.load_image` reads).
        size_hw: (H, W) of the image, the frame of every mask.
        masks: COCO RLEs, one per instance.
        class_names: one name per mask, or None when the dataset has no classes.
        image_id: a stable id, unique within its dataset (used by splits).
        dataset: the dataset's name (``coco128``, ``pennfudan``, ``kvasir``, ``bsds``, ...).
        groups: optional per-mask group index (BSDS: the annotator), so samplers can keep one partition.
    """

    image_path: str
    size_hw: tuple[int, int]
    masks: list[RLE]
    class_names: list[str] | None = None
    image_id: str = ""
    dataset: str = ""
    groups: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image_path": self.image_path, "size_hw": list(self.size_hw), "masks": self.masks,
                             "image_id": self.image_id, "dataset": self.dataset}
        if self.class_names is not None:
            d["class_names"] = self.class_names
        if self.groups is not None:
            d["groups"] = self.groups
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | None = None) -> InstanceRecord:
        path = d["image_path"]
        if root is not None and not Path(path).is_absolute():
            path = str(root / path)
        return cls(image_path=path, size_hw=(int(d["size_hw"][0]), int(d["size_hw"][1])), masks=list(d["masks"]),
                   class_names=d.get("class_names"), image_id=str(d.get("image_id", "")),
                   dataset=str(d.get("dataset", "")), groups=d.get("groups"))


# ----------------------------------------------------------------------------- RLE codec
def _counts_of(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:  # counts start with a run of zeros
        runs = [0, *runs]
    return runs


def _counts_to_string(counts: list[int]) -> str:
    """COCO's compact counts string: each count (delta-coded after the second) as 5-bit LEB128 chars + 48."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - int(counts[i - 2]) if i > 2 else int(c)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not ch & 0x10) or (x == -1 and ch & 0x10))
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _string_to_counts(s: str | bytes) -> list[int]:
    """COCO's compressed counts string → run lengths; ValueError for a string pycocotools would refuse.

    The checks matter: a cut-off or hand-edited string otherwise decodes to garbage runs (or an IndexError)
    that only fail much later, when a pack or a training batch decodes the mask.
    """
    if isinstance(s, bytes):
        s = s.decode("ascii", errors="replace")
    counts: list[int] = []
    p = 0
    n = len(s)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                raise ValueError("the RLE counts string is cut off in the middle of a run length")
            ch = ord(s[p]) - 48
            if not 0 <= ch < 64:
                raise ValueError(f"the RLE counts string has {s[p]!r} at position {p}; COCO counts use only "
                                 "the characters '0' to 'o'")
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and ch & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"the RLE counts string gives run {len(counts)} a negative length ({x})")
        counts.append(x)
    return counts


def encode_mask(mask: np.ndarray) -> RLE:
    """(H, W) bool → compressed COCO RLE with a str ``counts``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"encode_mask expects an (H, W) mask, got shape {m.shape}")
    try:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("ascii")}
    except ImportError:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _counts_to_string(_counts_of(m))}


def decode_rle(rle: RLE) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts or a list of counts) → (H, W) bool."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _string_to_counts(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w:
        raise InputError(f"RLE counts sum to {int(counts.sum())} but size is {h}x{w}; the annotation is corrupt")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


def runs_area(runs: list[int]) -> int:
    """Pixels set in a mask of these run lengths: every second run, since COCO counts start with a run of zeros."""
    return int(sum(runs[1::2]))


def rle_area(rle: RLE) -> int:
    """Pixels set in the mask of ``rle``, counted from its run lengths (no decode to a bitmap)."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _string_to_counts(counts)
    return runs_area(counts)


def rle_bbox_xyxy(rle: RLE) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1), inclusive pixel indices, of a non-empty mask."""
    m = decode_rle(rle)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ----------------------------------------------------------------------------- problems found while reading
@dataclass
class ReadReport:
    """What a reader skipped, so a person packing their own data hears about it instead of losing it quietly.

    ``bad`` holds unusable images (``"path: reason"``); a caller that passes no report gets an error at
    the first one instead. ``notes`` are counted warnings about annotations that were left out, and
    ``skipped`` their counts by reason (``crowd``, ``no_segmentation``, ...), so an input left with no
    object can be told why instead of being told to check its paths.
    """

    bad: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def bad_image(report: ReadReport | None, line: str) -> None:
    """Record an unusable image in ``report``, or raise at once when the caller keeps no report."""
    if report is None:
        from segany.errors import ImageLoadError

        raise ImageLoadError(line)
    report.bad.append(line)


def note(report: ReadReport | None, line: str) -> None:
    """A counted warning: kept in ``report`` for the caller to print, or logged when there is no report.

    Not both: with no logging handler configured, Python prints a warning bare on stderr, and the CLI
    prints the report's notes too, so every warning appeared twice.
    """
    import logging

    if report is not None:
        report.notes.append(line)
        logging.getLogger(__name__).debug(line)
    else:
        logging.getLogger(__name__).warning(line)


def _header(path: Path, report: ReadReport | None, orientation: bool) -> tuple[tuple[int, int], int] | None:
    """((H, W), EXIF orientation or 1) from one open of the file's header (no decode); None (reported) when it
    cannot be read. The tag is read only when ``orientation`` is asked for."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        bad_image(report, f"{path}: file not found")
        return None
    try:
        with Image.open(path) as im:
            w, h = im.size
            tag = _orientation(im) if orientation else 1
    except (OSError, UnidentifiedImageError) as exc:
        bad_image(report, f"{path}: not a readable image ({exc.__class__.__name__})")
        return None
    return (int(h), int(w)), tag


def image_size_hw(path: Path, report: ReadReport | None) -> tuple[int, int] | None:
    """(H, W) from the image file's header (cheap: no decode), or None (reported) when it cannot be read."""
    header = _header(path, report, orientation=False)
    return None if header is None else header[0]


# EXIF orientations 5 to 8 turn the picture a quarter: the shown image is the stored one with H and W swapped.
_QUARTER_TURNS = (5, 6, 7, 8)


def _orientation(im: Any) -> int:
    """The EXIF orientation tag (1 to 8) of an open PIL image, 1 when it has none or it cannot be read."""
    try:
        value = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


# (stored (H, W), shown (H, W), EXIF orientation): what image_frames_hw reads from a header.
ImageFrames = tuple[tuple[int, int], tuple[int, int], int]

# InstanceRecord.extra key where a reader that already opened the image's header leaves what it found: the
# ImageFrames, or the line saying why the header could not be read. Packing's size check takes it from there
# instead of opening every image a second time.
IMAGE_FRAMES = "image_frames"


def image_frames_hw(path: Path, report: ReadReport | None) -> ImageFrames | None:
    """(stored (H, W), shown (H, W), EXIF orientation) from the header; None (reported) when unreadable.

    The stored frame is the pixels as written in the file; the shown frame is what a viewer displays after
    applying the EXIF orientation. Annotations may be in either, so packing compares with both. One open of
    the file reads both the size and the tag.
    """
    header = _header(path, report, orientation=True)
    if header is None:
        return None
    stored, orientation = header
    shown = (stored[1], stored[0]) if orientation in _QUARTER_TURNS else stored
    return stored, shown, orientation
