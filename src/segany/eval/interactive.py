"""Interactive and box-prompt evaluation of a model on held-out records (SAM §7.1 protocol).

For each object: one box prompt (its tight box) gives box mIoU; then up to ``max_clicks`` simulated
clicks (:mod:`segany.eval.clicks`), each prediction fed the previous low-res logits as mask prompt.
The first click uses multimask output and keeps the mask with the highest predicted IoU, as an
interactive tool would. After a perfect mask the IoU is carried forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from segany.data.formats.common import InstanceRecord, decode_rle
from segany.errors import InputError
from segany.eval.clicks import first_click, mark_clicked, next_click
from segany.eval.metrics import iou, summarize_clicks

T = TypeVar("T")
ALL = "all"  # the tables' row for every dataset together


@dataclass
class ObjectResult:
    dataset: str
    image_id: str
    box_iou: float
    click_ious: list[float] = field(default_factory=list)
    index: int = 0  # which of the image's evaluated objects (largest first), to tell two objects of one image apart


def eval_objects(records: Sequence[InstanceRecord], max_objects_per_image: int | None = 8,
                 min_area: int = 64) -> list[tuple[InstanceRecord, list[np.ndarray]]]:
    """The objects evaluated per image: the largest ``max_objects_per_image`` masks (every object when it is
    None; first annotator only where records carry groups), so every method sees exactly the same objects."""
    out = []
    for rec in records:
        idx = list(range(len(rec.masks)))
        if rec.groups is not None and idx:
            first = min(rec.groups)
            idx = [i for i in idx if rec.groups[i] == first]
        masks = [decode_rle(rec.masks[i]) for i in idx]
        masks = [m for m in masks if m.sum() >= min_area]
        masks.sort(key=lambda m: -int(m.sum()))
        if max_objects_per_image is not None:
            masks = masks[:max_objects_per_image]
        if masks:
            out.append((rec, masks))
    return out


def box_of(mask: np.ndarray) -> np.ndarray:
    """The tight box (x0, y0, x1, y1) with inclusive corners, as training draws it (``mask_boxes_xyxy``).

    An object one pixel wide or tall gets one pixel more on that side: the predictor refuses a box of zero
    width, which would otherwise stop the whole evaluation.
    """
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return np.array([x0, y0, max(int(xs.max()), x0 + 1), max(int(ys.max()), y0 + 1)], dtype=np.float32)


def evaluate_model(model: Any, objects: Sequence[tuple[InstanceRecord, list[np.ndarray]]], *, max_clicks: int = 20,
                   use_prev_mask: bool = True, progress: Callable[[int], None] | None = None,
                   predictor_options: dict[str, Any] | None = None) -> list[ObjectResult]:
    """Run box and click prompts through a :class:`SamPredictor` for every object.

    ``predictor_options`` (e.g. ``precision="bf16", quantize="int8"``) evaluate a fast path instead of
    the default one, so its accuracy is measured with the same protocol as the model's.
    """
    from segany.data.images import load_image
    from segany.predictor import SamPredictor

    predictor = SamPredictor(model, **(predictor_options or {}))
    results = []
    for rec, masks in objects:
        predictor.set_image(load_image(rec.image_path))
        for index, gt in enumerate(masks):
            m, _, _ = predictor.predict(box=box_of(gt), multimask_output=False)
            res = ObjectResult(rec.dataset, rec.image_id, iou(m[0], gt), index=index)
            clicks = [first_click(gt)]
            clicked = np.zeros(gt.shape, dtype=bool)
            mark_clicked(clicked, clicks[0])
            prev = None
            for k in range(max_clicks):
                coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32)
                labels = np.array([1 if c.positive else 0 for c in clicks])
                multi = k == 0
                masks_k, scores, low = predictor.predict(point_coords=coords, point_labels=labels,
                                                         mask_input=prev if use_prev_mask else None,
                                                         multimask_output=multi)
                j = int(np.argmax(scores)) if multi else 0
                pred = masks_k[j]
                prev = low[j : j + 1]
                res.click_ious.append(iou(pred, gt))
                click = next_click(gt, pred, clicked)
                if click is None:
                    res.click_ious.extend([res.click_ious[-1]] * (max_clicks - k - 1))
                    break
                clicks.append(click)
                mark_clicked(clicked, click)
            results.append(res)
            if progress:
                progress(1)
    return results


def by_dataset(items: Sequence[T], dataset: Callable[[T], str]) -> dict[str, list[T]]:
    """``items`` per dataset, in first-seen order, then all of them under ``"all"`` (the tables' rows).

    The "all" row pools the objects (or, for AR, the images): each dataset weighs by its size. A dataset
    itself named "all" is refused, since the aggregate row would silently replace its own.
    """
    groups: dict[str, list[T]] = {}
    for it in items:
        name = dataset(it)
        if name == ALL:
            raise InputError(f"a dataset is named {ALL!r}, the name of the tables' row for every dataset together; "
                             "pack it again under another name (segany data pack ... --name NAME)")
        groups.setdefault(name, []).append(it)
    groups[ALL] = list(items)
    return groups


def summarize(results: Sequence[ObjectResult], max_clicks: int = 20) -> dict[str, Any]:
    """Per dataset and overall: mIoU by clicks, 1/5-click mIoU, NoC@85/90 and box mIoU."""
    out: dict[str, Any] = {}
    for name, rs in by_dataset(results, lambda r: r.dataset).items():
        s = summarize_clicks([r.click_ious for r in rs], max_clicks) if rs and rs[0].click_ious else \
            {"objects": len(rs)}
        s["box_miou"] = round(float(np.mean([r.box_iou for r in rs])), 4) if rs else None
        out[name] = s
    return out
