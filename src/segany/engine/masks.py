"""Mask ⇄ COCO RLE conversion for the store, its exports and the server.

The store keeps every mask as COCO *compressed* RLE (``{"size": [H, W], "counts": str}``,
column-major, as pycocotools writes it). Clients may send uncompressed RLE (``counts`` a list of
run lengths starting with zeros, column-major) because it is a few lines of JavaScript.

Whatever form arrives, :func:`normalize_rle` checks that its runs cover exactly ``H * W`` pixels and
stores the one canonical string pycocotools would write for that mask. pycocotools itself checks neither:
it decodes a compressed string whose runs fall short by leaving the rest of the mask uninitialised, so
such a mask would export as different garbage each time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany.errors import InputError

# pycocotools keeps run lengths as 32-bit unsigned ints.
_MAX_RUN = 2**32 - 1
# A run or a difference of runs within ±2**35 takes at most 7 characters of 5 bits; more is not COCO RLE
# (and would overflow pycocotools' shifts).
_MAX_TOKEN_CHARS = 7


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool/uint8 mask → compressed RLE with a ``str`` counts field."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W), got shape {m.shape}")
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def compressed_runs(counts: str | bytes) -> np.ndarray:
    """The run lengths (int64) a COCO compressed RLE string encodes; :class:`InputError` if it is not one.

    The string is pycocotools' LEB128-like code: each character is ``48 + 6 bits``, 5 value bits and a
    continuation bit (0x20); the last character of a number carries its sign in bit 0x10; from the fourth
    run on, each number is the difference to the run two before. Decoded here, vectorised, because
    pycocotools reads past the end of a truncated string and never says when the runs do not cover the mask.
    """
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError as exc:
        raise InputError("RLE counts hold non-ASCII characters; send COCO compressed RLE (characters '0' to "
                         "'o') or a list of run lengths") from exc
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    outside = np.flatnonzero((c < 0) | (c > 63))
    if outside.size:
        ch = chr(raw[outside[0]])
        raise InputError(f"RLE counts hold {ch!r} at position {int(outside[0])}, outside COCO compressed RLE's "
                         "characters '0' to 'o'; send the counts string pycocotools wrote, or a list of run lengths")
    more = (c & 0x20) != 0
    if more[-1]:
        raise InputError("RLE counts end in the middle of a number (the string was cut short); send the whole "
                         "counts string")
    ends = np.flatnonzero(~more)  # last character of each number
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_TOKEN_CHARS:
        raise InputError(f"RLE counts hold a number {int(lengths.max())} characters long (COCO RLE needs at most "
                         f"{_MAX_TOKEN_CHARS}); the string is not COCO compressed RLE")
    pos = np.arange(c.size) - np.repeat(starts, lengths)  # each character's place within its number
    values = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * lengths[negative])
    runs = values.copy()
    # runs[i] = values[i] + runs[i - 2] for i > 2: running sums over the odd and over the even (from 2) entries.
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _check_runs(runs: np.ndarray, h: int, w: int, form: str) -> None:
    """Refuse runs that a mask of ``h`` x ``w`` cannot have: negative, too long, or not adding up to h * w."""
    if runs.size and int(runs.min()) < 0:
        i = int(np.argmin(runs))
        raise InputError(f"{form} RLE run {i} is negative ({int(runs[i])}); runs are pixel counts, column-major, "
                         "starting with a run of zeros")
    if runs.size and int(runs.max()) > _MAX_RUN:
        raise InputError(f"{form} RLE has a run of {int(runs.max())} pixels, more than COCO RLE holds "
                         f"({_MAX_RUN}); split the mask or send a smaller one")
    total = int(runs.sum())
    if total != h * w:
        raise InputError(f"{form} RLE counts sum to {total} pixels but size {h}x{w} needs {h * w}; counts are "
                         "column-major run lengths starting with a run of zeros and must cover the whole mask")


def _canonical_runs(runs: np.ndarray) -> list[int]:
    """The runs pycocotools' encoder would write for the same mask: no empty run except a leading one.

    ``[0, 5, 0, 3]`` and ``[0, 8]`` are the same mask; storing one form lets a re-import or a dedup compare
    counts strings instead of decoding masks.
    """
    values = np.arange(runs.size) % 2  # a run's pixel value: runs alternate 0, 1, 0, ...
    keep = runs > 0
    runs, values = runs[keep], values[keep]
    if runs.size == 0:
        return [0]
    change = np.flatnonzero(np.diff(values) != 0) + 1  # merge neighbours left with the same value
    merged = np.add.reduceat(runs, np.concatenate(([0], change)))
    out = [int(v) for v in merged]
    return [0, *out] if values[0] == 1 else out


def normalize_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Any COCO RLE (compressed str/bytes or uncompressed list counts) → canonical compressed RLE, str counts.

    Raises :class:`InputError` unless the runs are non-negative and cover exactly ``H * W`` pixels.
    """
    # Always re-encoded: a compressed string whose runs are canonical can still spell a number with more 5-bit
    # groups than pycocotools writes, and the same mask must give the same string (retries, dedup compare them).
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError("an RLE must be a dict with 'size' [H, W] and 'counts'; got "
                         f"{type(rle).__name__} with keys {sorted(rle) if isinstance(rle, dict) else '-'}")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 100_000 for v in size)):
        raise InputError(f"RLE 'size' must be [height, width] of positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise InputError("uncompressed RLE 'counts' must be a list of non-negative integers")
        if counts and max(counts) > _MAX_RUN:  # checked here: numpy's int64 could not even hold some
            raise InputError(f"uncompressed RLE has a run of {max(counts)} pixels, more than COCO RLE holds "
                             f"({_MAX_RUN}); runs are pixel counts of a mask of size {h}x{w}")
        runs = np.asarray(counts, dtype=np.int64)
        _check_runs(runs, h, w, "uncompressed")
    elif isinstance(counts, (str, bytes)):
        runs = compressed_runs(counts)
        _check_runs(runs, h, w, "compressed")
    else:
        raise InputError(f"RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}")
    out = mask_utils.frPyObjects({"size": [h, w], "counts": _canonical_runs(runs)}, h, w)
    c = out["counts"]
    return {"size": [h, w], "counts": c.decode("ascii") if isinstance(c, bytes) else c}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Compressed or uncompressed RLE → (H, W) bool mask."""
    r = normalize_rle(rle)
    return mask_utils.decode({"size": r["size"], "counts": r["counts"].encode("ascii")}).astype(bool)


def rle_area_bbox(rle: dict[str, Any]) -> tuple[int, list[float]]:
    """Pixel area and [x, y, w, h] bounding box of a compressed RLE."""
    r = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(r)), [float(v) for v in mask_utils.toBbox(r).tolist()]

