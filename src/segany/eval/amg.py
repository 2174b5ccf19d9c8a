"""Automatic masks as object proposals: class-agnostic mask AR@K on held-out records (SAM §7.3's measure).

Why: 1-click mIoU and NoC judge the promptable model; "segment everything" also depends on how the
generator's grid, filters and NMS turn its outputs into a ranked set, which only a proposal metric
sees. Each image's proposals are ranked by predicted IoU, as SAM's generator scores them, and AR@K
averages recall over IoU 0.50:0.95 with pycocotools (:func:`segany.eval.metrics.average_recall`).

Ground truth: every instance of the image with at least ``min_area`` pixels; where a dataset has
several annotators (BSDS500), the first one's segments, as in the interactive evaluation.

The same proposals are also scored under other rankings (``rankings``: stability score, their product,
and a seeded random order). Only the order differs, so the gap to "random" is what the IoU head's
ranking is worth, the first thing to look at when AR@10 is low and AR@1000 is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from segany.data.formats.common import InstanceRecord
from segany.eval.interactive import by_dataset, eval_objects
from segany.eval.metrics import average_recall

MAX_DETS = (10, 100, 1000)


@dataclass(frozen=True)
class AmgEvalSettings:
    """Generator settings for proposals. The filters are off by default: a ranked proposal set is judged
    by AR@K, so thresholds tuned for display (SAM's 0.88 / 0.95) would only hide candidates."""

    points_per_side: int = 16
    pred_iou_thresh: float = 0.0
    stability_score_thresh: float = 0.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0


def evaluate_amg(model: Any, records: Sequence[InstanceRecord], settings: AmgEvalSettings | None = None, *,
                 min_area: int = 64, predictor_options: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """AR@10/100/1000 per dataset and overall for ``model``'s automatic masks on ``records``."""
    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.data.formats.common import encode_mask
    from segany.data.images import load_image
    from segany.predictor import SamPredictor

    s = settings or AmgEvalSettings()
    gen = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **asdict(s))
    if predictor_options:
        gen.predictor = SamPredictor(model, **predictor_options)
    rows = []
    t0 = time.time()
    from segany.eval.run import check_objects

    objects = eval_objects(records, max_objects_per_image=None, min_area=min_area)
    check_objects(sum(len(m) for _, m in objects), len(records), min_area)
    for rec, masks in objects:
        anns = gen.generate(load_image(rec.image_path))
        rows.append({"dataset": rec.dataset, "size_hw": tuple(rec.size_hw),
                     "gt": [encode_mask(m) for m in masks],
                     "proposals": [{"segmentation": a["segmentation"], "predicted_iou": float(a["predicted_iou"]),
                                    "stability_score": float(a["stability_score"])} for a in anns]})
        if progress is not None:
            progress(1)
    seconds = time.time() - t0
    out: dict[str, Any] = {"settings": asdict(s), "min_area": min_area, "seconds": round(seconds, 1)}
    groups = by_dataset(rows, lambda r: r["dataset"])
    for name, group in groups.items():
        out[name] = _summary(group, RANKINGS["predicted_iou"])
    out["rankings"] = {name: {k: v for k, v in _summary(rows, score).items() if k.startswith("AR@")}
                       for name, score in RANKINGS.items()}
    return out


def _random_score(p: dict[str, Any]) -> float:
    # Seeded by the mask itself, so the "random" order is the same on every run and machine.
    import zlib

    counts = p["segmentation"]["counts"]
    return zlib.crc32(counts.encode() if isinstance(counts, str) else bytes(counts)) / 2**32


RANKINGS: dict[str, Callable[[dict[str, Any]], float]] = {
    "predicted_iou": lambda p: p["predicted_iou"],  # SAM's generator's score, the headline figures
    "stability_score": lambda p: p["stability_score"],
    "iou_x_stability": lambda p: p["predicted_iou"] * p["stability_score"],
    "random": _random_score,
}


def _summary(rows: Sequence[dict[str, Any]], score: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    proposals = [[{"segmentation": p["segmentation"], "score": score(p)} for p in r["proposals"]] for r in rows]
    ar = average_recall([r["gt"] for r in rows], proposals, [r["size_hw"] for r in rows], max_dets=MAX_DETS)
    return {"images": len(rows), "objects": sum(len(r["gt"]) for r in rows),
            "proposals_per_image": round(float(np.mean([len(p) for p in proposals])), 1) if rows else 0.0,
            **{k: round(v, 4) for k, v in ar.items()}}


def format_amg_table(result: dict[str, Any]) -> str:
    keys = [k for k in result if isinstance(result[k], dict) and "images" in result[k]]
    rankings = result.get("rankings", {})
    lines = [f"{'dataset':10s} {'images':>6s} {'objects':>7s} {'props':>6s} " + " ".join(f"{'AR@' + str(n):>8s}"
                                                                                   for n in MAX_DETS)]
    lines.append("-" * len(lines[0]))
    for k in keys:
        r = result[k]
        lines.append(f"{k:10s} {r['images']:6d} {r['objects']:7d} {r['proposals_per_image']:6.1f} "
                     + " ".join(f"{r[f'AR@{n}']:8.3f}" for n in MAX_DETS))
    for name, r in rankings.items():
        lines.append(f"all, ranked by {name}: " + ", ".join(f"AR@{n} {r[f'AR@{n}']:.3f}" for n in MAX_DETS))
    return "\n".join(lines)
