"""Overlay of all masks of one image, for a person to look at."""

from __future__ import annotations

from typing import Any

import numpy as np

from segany.data.rle import coco_to_mask


def _mask_of(seg: Any) -> np.ndarray:
    return seg if isinstance(seg, np.ndarray) else coco_to_mask(seg)


def render_overlay(image: np.ndarray, records: list[dict[str, Any]], alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: masks painted largest first in random colours, with their outlines.

    Largest first, so small masks stay visible on top of the big ones they lie in.
    """
    import cv2

    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(seed)
    order = sorted(range(len(records)), key=lambda i: -int(records[i]["area"]))
    colors = rng.integers(40, 256, size=(len(records), 3)).astype(np.float32)
    edges = np.zeros(image.shape[:2], dtype=bool)
    for i in order:
        m = np.ascontiguousarray(_mask_of(records[i]["segmentation"]))
        out[m] = (1 - alpha) * out[m] + alpha * colors[i]
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        canvas = np.zeros(m.shape, dtype=np.uint8)
        cv2.drawContours(canvas, contours, -1, 1, thickness=1)
        edges |= canvas.astype(bool)
    out[edges] = 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay(path: str, image: np.ndarray, records: list[dict[str, Any]]) -> None:
    from PIL import Image

    Image.fromarray(render_overlay(image, records)).save(path, format="PNG")
