"""The click simulator of the interactive-segmentation protocol (as in RITM and SAM §7.1).

First click: the point of the object farthest from its boundary (maximum of the distance transform).
Next clicks: the centre (distance-transform maximum) of the largest error region, positive when that
region is a false negative (missed object), negative when it is a false positive. The image border
counts as boundary, so clicks never land on the frame edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segany.errors import InputError


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    positive: bool


def _distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel or the image border."""
    import cv2

    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def _centre(region: np.ndarray) -> tuple[int, int]:
    dist = _distance(region)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first maximum in row-major order
    return int(x), int(y)


def first_click(gt: np.ndarray) -> Click:
    """The first click on a (H, W) bool object mask."""
    gt = np.asarray(gt, dtype=bool)
    if gt.ndim != 2 or not gt.any():
        raise InputError(f"first_click needs a non-empty (H, W) mask, got shape {gt.shape} with {int(gt.sum())} px")
    x, y = _centre(gt)
    return Click(x, y, True)


def largest_component(region: np.ndarray) -> np.ndarray:
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(region, dtype=bool)
    i = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == i


def next_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """The corrective click for prediction ``pred`` of object ``gt`` (both (H, W) bool); None if perfect.

    The largest connected error region wins; on a tie in area the false-negative region is chosen.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise InputError(f"gt {gt.shape} and prediction {pred.shape} must have the same shape")
    fn = largest_component(gt & ~pred)
    fp = largest_component(pred & ~gt)
    a_fn, a_fp = int(fn.sum()), int(fp.sum())
    if a_fn == 0 and a_fp == 0:
        return None
    positive = a_fn >= a_fp
    x, y = _centre(fn if positive else fp)
    return Click(x, y, positive)
