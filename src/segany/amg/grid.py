"""Point grids and crop boxes of automatic mask generation (SAM appendix B).

Crop layer 0 is the whole image; layer i tiles the image with (2**i)**2 overlapping crops whose
point grid is ``crop_n_points_downscale_factor**i`` times sparser per side.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) cell-centre points (x, y) in [0, 1], x varying fastest."""
    half = 1.0 / (2 * n_per_side)
    ticks = np.linspace(half, 1.0 - half, n_per_side)
    xs = np.tile(ticks[None, :], (n_per_side, 1))
    ys = np.tile(ticks[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(points_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer 0..n_layers."""
    return [point_grid(int(points_per_side / (downscale ** i))) for i in range(n_layers + 1)]


def crop_boxes(size_hw: tuple[int, int], n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, ints, end-exclusive) over all layers and each box's layer index."""
    h, w = size_hw
    boxes: list[list[int]] = [[0, 0, w, h]]
    layers: list[int] = [0]
    short = min(h, w)
    for layer in range(1, n_layers + 1):
        n = 2 ** layer
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = math.ceil((overlap * (n - 1) + w) / n)
        crop_h = math.ceil((overlap * (n - 1) + h) / n)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        # x-major order, as the reference enumerates crops (the order decides NMS ties).
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
            layers.append(layer)
    return boxes, layers
