"""Mask ⇄ COCO RLE conversion for the store, its exports and the server.

The store keeps every mask as COCO *compressed* RLE (``{"size": [H, W], "counts": str}``,
column-major, as pycocotools writes it). Clients may send uncompressed RLE (``counts`` a list of
run lengths starting with zeros, column-major) because it is a few lines of JavaScript.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany.errors import InputError


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool/uint8 mask → compressed RLE with a ``str`` counts field."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W), got shape {m.shape}")
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def normalize_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Any COCO RLE (compressed str/bytes or uncompressed list counts) → compressed RLE with str counts."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError("an RLE must be a dict with 'size' [H, W] and 'counts'; got "
                         f"{type(rle).__name__} with keys {sorted(rle) if isinstance(rle, dict) else '-'}")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and 0 < v <= 100_000 for v in size)):
        raise InputError(f"RLE 'size' must be [height, width] of positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise InputError("uncompressed RLE 'counts' must be a list of non-negative integers")
        if sum(counts) != h * w:
            raise InputError(f"uncompressed RLE counts sum to {sum(counts)} but size {h}x{w} needs {h * w}; "
                             "counts are column-major run lengths starting with a run of zeros")
        out = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, (str, bytes)):
        raw = counts.encode("ascii") if isinstance(counts, str) else counts
        out = {"size": [h, w], "counts": raw}
        try:
            decoded = mask_utils.decode(out)
        except Exception as exc:  # pycocotools raises bare errors on garbage
            raise InputError(f"RLE counts could not be decoded ({exc}); send COCO compressed RLE") from exc
        if decoded.shape != (h, w):
            raise InputError("RLE counts do not match its size")
    else:
        raise InputError(f"RLE 'counts' must be a string or a list of ints, got {type(counts).__name__}")
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
