"""Small-region clean-up of generated masks (SAM appendix B "postprocessing"), with OpenCV.

Holes and islands smaller than ``min_area`` pixels are removed. Connected components are computed
on each mask's bounding-box window (plus a one-pixel ring of background) instead of the whole
image, so the cost follows the mask's size; component sizes that reach outside the window are
corrected with the exact area outside it, which gives the same result as a whole-image pass.
"""

from __future__ import annotations

import cv2
import numpy as np

from segany.data.rle import counts_to_mask, mask_to_counts


def _components(binary: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return n, labels, stats[:, cv2.CC_STAT_AREA].astype(np.int64)


def _fill_holes(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    n, labels, sizes = _components(~mask)
    small = np.flatnonzero(sizes[1:] < min_area) + 1
    if small.size == 0:
        return mask, False
    return mask | np.isin(labels, small), True


def _drop_islands(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    n, labels, sizes = _components(mask)
    fg = sizes[1:]
    small = fg < min_area
    if not small.any():
        return mask, False
    keep = np.flatnonzero(~small) + 1
    if keep.size == 0:  # every island is small: keep the largest (first on ties, as argmax)
        keep = np.array([int(np.argmax(fg)) + 1])
    return np.isin(labels, keep), True


def _small_islands_tie(mask: np.ndarray, min_area: int) -> bool:
    """Every island is small and several share the largest size: :func:`_drop_islands` then keeps the one
    OpenCV labels first, and OpenCV scans in 2 x 2 blocks, so a window starting on an odd row or column can
    label them in another order than the whole image does. Those masks take the whole-image path."""
    _, _, sizes = _components(mask)
    fg = sizes[1:]
    return fg.size > 1 and bool((fg < min_area).all()) and int((fg == fg.max()).sum()) > 1


def clean_mask_full(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill small holes, then drop small islands, on the whole (H, W) mask."""
    mask, filled = _fill_holes(mask, min_area)
    mask, dropped = _drop_islands(mask, min_area)
    return mask, filled or dropped


def _window_holes(win: np.ndarray, ring: tuple[bool, bool, bool, bool], size_hw: tuple[int, int],
                  window_xyxy: tuple[int, int, int, int], min_area: int) -> tuple[np.ndarray, bool] | None:
    """Fill small holes inside a window whose ring sides (left, top, right, bottom) are background.

    Returns None when a background component that reaches outside the window is small, because
    filling it would grow the mask outside the window (then the caller uses the whole image).
    """
    h, w = size_hw
    x0, y0, x1, y1 = window_xyxy  # end-exclusive
    n, labels, sizes = _components(~win)
    sizes = sizes.copy()
    left, top, right, bottom = ring
    outside = h * w - (x1 - x0) * (y1 - y0)
    # Background components that reach outside the window: (label, outside pixels joined to it).
    outer: list[tuple[int, int]] = []
    if outside > 0:
        if y0 == 0 and y1 == h:  # the outside is a left and a right band, not connected to each other
            if left:
                outer.append((int(labels[0, 0]), x0 * h))
            if right:
                outer.append((int(labels[0, -1]), (w - x1) * h))
        elif x0 == 0 and x1 == w:  # a top and a bottom band
            if top:
                outer.append((int(labels[0, 0]), y0 * w))
            if bottom:
                outer.append((int(labels[-1, 0]), (h - y1) * w))
        else:  # one connected region, touching every ring side present
            outer.append((int(labels[0, 0] if (left or top) else labels[-1, -1]), outside))
    for lab, extra in outer:
        sizes[lab] += extra
    touching = {lab for lab, _ in outer}
    small = np.flatnonzero(sizes[1:] < min_area) + 1
    if small.size == 0:
        return win, False
    if touching & set(small.tolist()):
        return None
    return win | np.isin(labels, small), True


def clean_mask_windowed(counts: np.ndarray, box_xyxy: np.ndarray, size_hw: tuple[int, int], min_area: int
                        ) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """Clean one mask given its RLE counts and inclusive bounding box.

    Returns:
        (new counts or None if unchanged, new inclusive box, changed).
    """
    h, w = size_hw
    mask = counts_to_mask(counts, size_hw)
    bx0, by0, bx1, by1 = (int(v) for v in box_xyxy)
    x0, y0 = max(bx0 - 1, 0), max(by0 - 1, 0)
    x1, y1 = min(bx1 + 2, w), min(by1 + 2, h)
    ring = (x0 < bx0, y0 < by0, x1 > bx1 + 1, y1 > by1 + 1)
    win = np.ascontiguousarray(mask[y0:y1, x0:x1])
    # An empty mask has no box to window on: it takes the whole-image path (as rare as it is cheap).
    res = _window_holes(win, ring, size_hw, (x0, y0, x1, y1), min_area) if mask.any() else None
    if res is not None and _small_islands_tie(res[0], min_area):
        res = None  # which tied island survives follows OpenCV's label order, which depends on the window
    if res is None:  # rare: a thin band outside the box is a "hole"; do it exactly on the whole image
        full, changed = clean_mask_full(np.ascontiguousarray(mask), min_area)
        if not changed:
            return None, np.asarray(box_xyxy), False
        ys, xs = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
        box = np.array([xs[0], ys[0], xs[-1], ys[-1]]) if xs.size else np.zeros(4, dtype=np.int64)
        return mask_to_counts(full), box, True
    win, filled = res
    win, dropped = _drop_islands(win, min_area)
    if not (filled or dropped):
        return None, np.asarray(box_xyxy), False
    full = np.zeros((h, w), dtype=bool)
    full[y0:y1, x0:x1] = win
    rows, cols = win.any(axis=1), win.any(axis=0)
    if rows.any():
        ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
        box = np.array([x0 + xs[0], y0 + ys[0], x0 + xs[-1], y0 + ys[-1]], dtype=np.int64)
    else:
        box = np.zeros(4, dtype=np.int64)
    return mask_to_counts(full), box, True
