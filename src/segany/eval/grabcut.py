"""Classical baseline: OpenCV GrabCut (Rother et al. 2004) initialised from the object's box.

Same objects, same boxes as the model's box prompt. Images are processed in parallel processes,
since GrabCut is CPU-bound and single-threaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from segany.data.formats.common import InstanceRecord
from segany.eval.interactive import ObjectResult, box_of
from segany.eval.metrics import iou


def grabcut_box(image_rgb: np.ndarray, box_xyxy: np.ndarray, iterations: int = 5) -> np.ndarray:
    """GrabCut mask (H, W) bool from an inclusive (x0, y0, x1, y1) box."""
    import cv2

    h, w = image_rgb.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    rect = (x0, y0, max(1, x1 - x0 + 1), max(1, y1 - y0 + 1))
    if rect[2] >= w - 1 and rect[3] >= h - 1:  # a full-frame box leaves no background to model
        rect = (1, 1, w - 2, h - 2)
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), mask, rect, bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_RECT)
    except cv2.error:  # degenerate boxes (1 px wide): fall back to the box itself
        out = np.zeros((h, w), bool)
        out[y0 : y1 + 1, x0 : x1 + 1] = True
        return out
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _one_image(args: tuple[str, str, str, list[np.ndarray]]) -> list[ObjectResult]:
    from segany.data.images import load_image

    path, dataset, image_id, masks = args
    image = load_image(path)
    return [ObjectResult(dataset, image_id, iou(grabcut_box(image, box_of(gt)), gt), index=k)
            for k, gt in enumerate(masks)]


def evaluate_grabcut(objects: Sequence[tuple[InstanceRecord, list[np.ndarray]]], workers: int = 1,
                     progress: Callable[[int], None] | None = None) -> list[ObjectResult]:
    jobs = [(rec.image_path, rec.dataset, rec.image_id, masks) for rec, masks in objects]
    results: list[ObjectResult] = []
    if workers <= 1:
        for job in jobs:
            results.extend(_one_image(job))
            if progress:
                progress(len(job[3]))
        return results
    with ProcessPoolExecutor(workers) as pool:
        for job, rs in zip(jobs, pool.map(_one_image, jobs, chunksize=2), strict=True):
            results.extend(rs)
            if progress:
                progress(len(job[3]))
    return results
