"""Evaluation of class labels (issue 10) on held-out labelled images.

* **Per-class mask AP** (pycocotools ``segm``) of "segment every <class>" prompts: for each image the
  model's point grid is decoded once (closed vocabulary: proposals do not depend on the class), every
  candidate is scored ``predicted IoU × P(class)`` for each class, and box NMS keeps the instances.
* **Label accuracy of automatic masks**: masks of :class:`~segany.amg.generator.SamAutomaticMaskGenerator`
  are labelled by the class head (:func:`~segany.text.prompting.label_masks`), matched one-to-one to
  ground truth at mask IoU ≥ 0.5, and a match counts as correct when the labels agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from segany.data.formats.common import InstanceRecord, decode_rle, encode_mask
from segany.modeling.sam import Sam


def _coco_gt(records: Sequence[InstanceRecord], names: Sequence[str]) -> dict[str, Any]:
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    index = {n: i + 1 for i, n in enumerate(names)}
    images, anns = [], []
    for img_id, r in enumerate(records, start=1):
        images.append({"id": img_id, "height": r.size_hw[0], "width": r.size_hw[1]})
        for rle, name in zip(r.masks, r.class_names or [], strict=True):
            if name not in index:
                continue
            m = decode_rle(rle)
            ys, xs = np.nonzero(m)
            bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)] if xs.size else [0] * 4
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": index[name], "iscrowd": 0,
                         "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
                         "area": float(m.sum()), "bbox": bbox})
    return {"images": images, "annotations": anns, "categories": cats}


def evaluate_labels(model: Sam, records: Sequence[InstanceRecord], *, points_per_side: int = 16,
                    min_score: float = 0.02, max_per_class: int = 50, auto_kwargs: dict[str, Any] | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-class mask AP of "segment every <class>" and label accuracy of automatic masks."""
    try:
        from pycocotools.coco import COCO
    except ImportError:  # GPU boxes may lack it: keep the label-accuracy figures, say why AP is missing
        COCO = None

    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.data.images import load_image
    from segany.predictor import SamPredictor
    from segany.text.prompting import label_masks, label_probs, propose, select

    assert model.class_head is not None
    names = list(model.class_head.class_names)
    predictor = SamPredictor(model)
    gen = SamAutomaticMaskGenerator(model, **(auto_kwargs or {"points_per_side": points_per_side,
                                                              "pred_iou_thresh": 0.5,
                                                              "stability_score_thresh": 0.7}))
    dets: list[dict[str, Any]] = []
    matched = correct = auto_masks = gt_total = gt_correct = 0
    confusion: dict[str, dict[str, int]] = {}
    # Per dataset: [gt instances, auto masks, matched, correct] (coco128 vs PennFudan read differently).
    by_ds: dict[str, list[int]] = {}
    for img_id, rec in enumerate(records, start=1):
        # [gt instances, auto masks, matched, correct, gt labelled correctly from their own box]
        ds_counts = by_ds.setdefault(rec.dataset or "?", [0, 0, 0, 0, 0])
        image = load_image(rec.image_path)
        predictor.set_image(image)
        cand = propose(predictor, points_per_side=points_per_side)
        probs = label_probs(model, cand["tokens"])  # (P, K)
        iou = cand["iou"].float().clamp(0, 1)
        present = {n for n in rec.class_names or []}
        for k, name in enumerate(names):
            if name not in present and probs[:, k].max() * iou.max() < min_score:
                continue
            scores = iou * probs[:, k]
            keep = select(cand["low_res"], scores, min_score=min_score, nms_iou=0.7, max_instances=max_per_class)
            if len(keep) == 0:
                continue
            masks = model.postprocess_masks(cand["low_res"][keep][:, None], predictor.input_size,
                                            predictor.original_size)[:, 0] > model.mask_threshold
            for m, s in zip(masks.cpu().numpy(), scores[keep].tolist(), strict=True):
                rle = encode_mask(m)
                dets.append({"image_id": img_id, "category_id": k + 1, "segmentation": rle, "score": float(s)})
        # Automatic masks → labels → matched to ground truth.
        auto = gen.generate(image)
        gt = [decode_rle(r) for r in rec.masks]
        if gt:  # the class head alone: ground-truth masks re-prompted by their boxes (label_masks)
            gt_labels, _ = label_masks(predictor, np.stack(gt))
            ok = sum(p == t for p, t in zip(gt_labels, rec.class_names or [], strict=True))
            gt_correct += ok
            ds_counts[4] += ok
        gt_total += len(gt)
        ds_counts[0] += len(gt)
        ds_counts[1] += len(auto)
        if auto and gt:
            am = np.stack([a["segmentation"] for a in auto])
            # The generator labels its masks itself (the model has a class head): score those labels.
            labels = [a["label"] for a in auto] if all("label" in a for a in auto) else label_masks(predictor, am)[0]
            auto_masks += len(am)
            a_flat = torch.as_tensor(am.reshape(len(am), -1), dtype=torch.float32)
            g_flat = torch.as_tensor(np.stack(gt).reshape(len(gt), -1), dtype=torch.float32)
            inter = a_flat @ g_flat.T
            union = a_flat.sum(1)[:, None] + g_flat.sum(1)[None] - inter
            ious = (inter / union.clamp(min=1)).numpy()
            used_a: set[int] = set()
            for g in np.argsort(-ious.max(0)):  # greedy one-to-one matching, best pairs first
                order = [a for a in np.argsort(-ious[:, g]) if a not in used_a]
                if not order or ious[order[0], g] < 0.5:
                    continue
                a = order[0]
                used_a.add(a)
                matched += 1
                true = (rec.class_names or [])[g]
                correct += labels[a] == true
                ds_counts[2] += 1
                ds_counts[3] += int(labels[a] == true)
                confusion.setdefault(true, {}).setdefault(labels[a], 0)
                confusion[true][labels[a]] += 1
        if progress:
            progress(1)
    gt_json = _coco_gt(records, names)
    n_gt = {n: sum(1 for a in gt_json["annotations"] if a["category_id"] == i + 1) for i, n in enumerate(names)}
    if COCO is None:
        dets = []
    coco = COCO() if COCO is not None else None
    if coco is not None:
        coco.dataset = gt_json
        coco.createIndex()
    per_class: dict[str, float] = {}
    mean_ap = mean_ap50 = float("nan")
    per_dataset: dict[str, dict[str, Any]] = {}
    if dets and coco is not None:
        dt = coco.loadRes(dets)
        mean_ap, mean_ap50, per_class = _coco_ap(coco, dt, names, max_per_class, None)
        for ds in sorted(by_ds):
            ids = [i for i, r in enumerate(records, start=1) if (r.dataset or "?") == ds]
            ap, ap50, pc = _coco_ap(coco, dt, names, max_per_class, ids)
            n_gt_ds, n_auto, n_match, n_ok, n_gt_ok = by_ds[ds]
            per_dataset[ds] = {"images": len(ids), "gt_instances": n_gt_ds, "mask_ap": ap, "mask_ap50": ap50,
                               "per_class_ap": {n: round(v, 4) for n, v in pc.items()},
                               "auto_masks": n_auto, "auto_matched_gt": n_match,
                               "auto_label_accuracy": n_ok / n_match if n_match else float("nan"),
                               "auto_recall_at_0.5": n_match / n_gt_ds if n_gt_ds else float("nan"),
                               "gt_box_label_accuracy": n_gt_ok / n_gt_ds if n_gt_ds else float("nan")}
    # The trivial labeller (every mask is the held-out set's commonest class), to read label accuracies against.
    counts: dict[str, int] = {}
    for r in records:
        for n in r.class_names or []:
            counts[n] = counts.get(n, 0) + 1
    majority, majority_n = max(counts.items(), key=lambda kv: kv[1]) if counts else ("", 0)
    return {
        "ap_note": None if COCO is not None else "pycocotools not installed: no AP",
        "images": len(records), "gt_instances": gt_total, "detections": len(dets),
        "mask_ap": mean_ap, "mask_ap50": mean_ap50,
        "per_class_ap": {n: round(v, 4) for n, v in sorted(per_class.items(), key=lambda kv: -n_gt[kv[0]])},
        "per_class_gt": {n: c for n, c in n_gt.items() if c},
        "gt_box_label_accuracy": gt_correct / gt_total if gt_total else float("nan"),
        "majority_class": majority, "majority_class_accuracy": majority_n / gt_total if gt_total else float("nan"),
        "auto_masks": auto_masks, "auto_matched_gt": matched,
        "auto_label_accuracy": correct / matched if matched else float("nan"),
        "auto_recall_at_0.5": matched / gt_total if gt_total else float("nan"),
        "confusion_top": {t: dict(sorted(c.items(), key=lambda kv: -kv[1])[:3]) for t, c in confusion.items()},
        "per_dataset": per_dataset,
    }


def _coco_ap(coco: Any, dt: Any, names: Sequence[str], max_per_class: int, img_ids: list[int] | None
             ) -> tuple[float, float, dict[str, float]]:
    """(mask AP, AP50, AP per class) over ``img_ids`` (all images when None).

    Only classes with ground truth in those images count: pycocotools leaves a class without ground truth
    at -1 and leaves it out of the mean, and it is left out of the per-class table here too.
    """
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco, dt, iouType="segm")
    ev.params.maxDets = [1, 10, max_per_class]
    if img_ids is not None:
        ev.params.imgIds = img_ids
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"]  # (T, R, K, A, M); A = 0 is area "all", M = -1 is max_per_class detections
    wanted = set(img_ids) if img_ids is not None else None
    gt_cats = {a["category_id"] for a in coco.dataset["annotations"] if wanted is None or a["image_id"] in wanted}
    per_class: dict[str, float] = {}
    for k, name in enumerate(names):
        if k + 1 not in gt_cats:
            continue
        p = prec[:, :, ev.params.catIds.index(k + 1), 0, -1]
        per_class[name] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    # Means straight from the precision array: COCOeval.summarize's AP@[.5:.95] looks for maxDets=100 and
    # reports -1 when max_per_class is anything else. Classes without ground truth stay -1 and are left out.
    p_all, p_50 = prec[:, :, :, 0, -1], prec[0, :, :, 0, -1]
    mean_ap = float(np.mean(p_all[p_all > -1])) if (p_all > -1).any() else float("nan")
    mean_ap50 = float(np.mean(p_50[p_50 > -1])) if (p_50 > -1).any() else float("nan")
    return mean_ap, mean_ap50, per_class
