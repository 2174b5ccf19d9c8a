"""Metrics: mask IoU, mIoU-vs-clicks, NoC@85/90, and AR@100/AR@1000 through pycocotools."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from segany.errors import require


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def noc(ious: Sequence[float], threshold: float, max_clicks: int = 20) -> int:
    """Number of clicks to reach ``threshold`` IoU; ``max_clicks`` when never reached (the usual cap).

    ``ious[k]`` is the IoU after k+1 clicks.
    """
    for k, v in enumerate(ious[:max_clicks]):
        if v >= threshold:
            return k + 1
    return max_clicks


def summarize_clicks(per_object: Sequence[Sequence[float]], max_clicks: int = 20) -> dict[str, Any]:
    """mIoU after 1..N clicks, mean NoC@85/90 and NoF@85/90 over objects (each a list of IoUs per click).

    NoF (number of failures) counts the objects that never reach the threshold within ``max_clicks``: each
    adds ``max_clicks`` to NoC, so without it a NoC near the cap cannot be read. RITM's count (``over_max``)
    also takes in objects that reach it exactly at the last click; this one does not.
    ``miou_5`` is the last click's mIoU when fewer than 5 clicks ran.
    """
    if not per_object:
        return {"objects": 0}
    arr = np.asarray([list(o)[:max_clicks] for o in per_object], dtype=np.float64)
    curve = arr.mean(0)
    return {
        "objects": len(arr),
        "miou_by_clicks": [round(float(v), 4) for v in curve],
        "miou_1": round(float(curve[0]), 4),
        "miou_5": round(float(curve[min(4, len(curve) - 1)]), 4),
        "noc85": round(float(np.mean([noc(o, 0.85, max_clicks) for o in arr])), 3),
        "noc90": round(float(np.mean([noc(o, 0.90, max_clicks) for o in arr])), 3),
        "nof85": int(sum(not (o >= 0.85).any() for o in arr)),
        "nof90": int(sum(not (o >= 0.90).any() for o in arr)),
        "max_clicks": int(arr.shape[1]),
    }


def average_recall(gt: Sequence[Sequence[dict]], proposals: Sequence[Sequence[dict]],
                   size_hw: Sequence[tuple[int, int]], max_dets: Sequence[int] = (100, 1000)) -> dict[str, float]:
    """Class-agnostic mask AR@N over IoU 0.50:0.95 with pycocotools' COCOeval.

    Args:
        gt: per image, the ground-truth COCO RLEs (``{"size", "counts"}``).
        proposals: per image, dicts with ``segmentation`` (RLE) and ``score``.
        size_hw: per image (H, W).
    """
    require("pycocotools", "train")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    aid = 1
    for i, ((h, w), g, p) in enumerate(zip(size_hw, gt, proposals, strict=True)):
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for rle in g:
            from pycocotools import mask as mask_utils

            coco_rle = _bytes_rle({"size": list(rle["size"]), "counts": rle["counts"]})
            area = float(mask_utils.area(coco_rle))
            bbox = [float(v) for v in mask_utils.toBbox(coco_rle)]
            anns.append({"id": aid, "image_id": i + 1, "category_id": 1, "segmentation": coco_rle, "area": area,
                         "bbox": bbox, "iscrowd": 0})
            aid += 1
        for d in p:
            dets.append({"image_id": i + 1, "category_id": 1, "segmentation": _bytes_rle(d["segmentation"]),
                         "score": float(d.get("score", 1.0))})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress to stdout, our results'
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else COCO()
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = 0
        ev.params.maxDets = sorted(set(max_dets))
        ev.evaluate()
        ev.accumulate()
    recall = ev.eval["recall"]  # (T IoU thresholds, K cats, A areas, M maxDets)
    out = {}
    for m, n in enumerate(ev.params.maxDets):
        r = recall[:, :, 0, m]  # area "all"
        out[f"AR@{n}"] = float(np.mean(r[r > -1])) if (r > -1).any() else 0.0
    return out


def _bytes_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def paired_bootstrap(diffs: Sequence[float], clusters: Sequence[Any], *, resamples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of paired differences (method A − method B on the same objects) with a bootstrap interval.

    Objects of one image are not independent (same lighting, same annotator), so whole images
    (``clusters``) are resampled, not objects; with one object per cluster this is the plain bootstrap.
    Returns the mean, the ``level`` percentile interval, and the share of objects where A is better.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "a_better": float("nan"),
                "objects": 0, "clusters": 0}
    keys = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    idx = np.fromiter((keys[c] for c in clusters), dtype=np.int64, count=d.size)
    n = len(keys)
    sums = np.bincount(idx, weights=d, minlength=n)
    counts = np.bincount(idx, minlength=n).astype(np.float64)
    rng = np.random.default_rng(seed)
    # Each resample draws n images with replacement; its mean is over all objects of the drawn images.
    # Chunked so that memory stays ~chunk × n whatever the number of resamples.
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        draws = rng.integers(0, n, (k, n))
        weights = np.bincount((draws + n * np.arange(k)[:, None]).ravel(), minlength=k * n).reshape(k, n)
        means[start : start + k] = (weights @ sums) / (weights @ counts)
    tail = (1.0 - level) / 2 * 100
    return {"mean": float(d.mean()), "ci_low": float(np.percentile(means, tail)),
            "ci_high": float(np.percentile(means, 100 - tail)), "a_better": float((d > 0).mean()),
            "objects": int(d.size), "clusters": n}
