"""One evaluation run: held-out records → model and (optionally) GrabCut results, JSON and a plot."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from segany.atomic import atomic_write_json, disk_full_as
from segany.data.formats import SHARED_DATASETS, SHARED_DIRS, read_shared
from segany.data.formats.common import InstanceRecord
from segany.errors import InputError, SeganyError

SPLITS = ("train", "val")


def writing(path: str | os.PathLike[str], option: str = "--out") -> contextlib.AbstractContextManager[None]:
    """A full disk while writing ``path`` becomes one SeganyError naming the file and the fix (free space, or
    another ``option``), not the temp file's name with "check the path and its permissions"
    (:func:`segany.atomic.disk_full_as`)."""
    return disk_full_as(SeganyError, path, f"Free space on that disk or pass another {option}, and run the "
                        "evaluation again")


def provenance(checkpoint: str | os.PathLike[str] | None, records: Sequence[InstanceRecord],
               split: str) -> dict[str, Any]:
    """What an evaluation's results come from: the segany and torch versions, the weights' sha256 (None
    without a file) and the data: ``{split: sha256 over the records, split + "_images": count}``, the digest
    ``segany train`` records for its held-out data (``provenance.data.val`` of a run's config.json), so equal
    values mean the same images and masks."""
    import torch

    import segany
    from segany.hashing import weights_digest
    from segany.train.data import records_fingerprint

    return {"segany_version": segany.__version__, "torch_version": str(torch.__version__),
            "weights_sha256": None if checkpoint is None else weights_digest(checkpoint),
            "data": {split: records_fingerprint(records), f"{split}_images": len(records)}}


def _check_datasets(datasets: list[str] | None, known: list[str], where: str) -> None:
    unknown = [d for d in datasets or [] if d not in known]
    if unknown:
        raise InputError(f"unknown dataset(s) {', '.join(map(repr, unknown))} in --datasets; {where} has "
                         f"{', '.join(known) or 'none'}")


def load_eval_records(data: str | os.PathLike[str], split: str = "val", datasets: list[str] | None = None,
                      limit_images: int | None = None, flag: str = "--data") -> list[InstanceRecord]:
    """Records from a pack folder (``manifest.json.gz``) or the shared-data root (``../shared/data``);
    ``flag`` is the option that named ``data``, for the error's fix (``engine retrain`` calls it --eval-data)."""
    root = Path(data)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose from {', '.join(SPLITS)} (val is the held-out images)")
    if limit_images is not None and limit_images < 1:
        raise InputError(f"--limit-images must be at least 1, got {limit_images}")
    if (root / "manifest.json.gz").exists():
        from segany.data.pack import load_pack

        recs = load_pack(root, split=split, datasets=datasets)
        if datasets and set(datasets) - {r.dataset for r in recs}:  # unknown, or only not in this split
            from segany.data.pack import pack_datasets

            _check_datasets(datasets, pack_datasets(root)[0], f"the pack {str(root)!r}")
    elif (root / SHARED_DIRS["pennfudan"]).exists() or (root / SHARED_DIRS["kvasir"]).exists():
        _check_datasets(datasets, list(SHARED_DATASETS), "the shared data")
        recs = []
        missing = [d for d in datasets or [] if not (root / SHARED_DIRS[d]).exists()]
        if missing:  # named, but its folder is not there: skipped without a word before
            raise InputError(f"dataset(s) {', '.join(missing)} of {flag.replace('data', 'datasets')} are not in "
                             f"{str(root)!r} (no {', '.join(SHARED_DIRS[d] + '/' for d in missing)}); drop them")
        for name in datasets or SHARED_DATASETS:
            if (root / SHARED_DIRS[name]).exists():
                recs.extend(read_shared(name, root)[split])
    else:
        raise InputError(f"{str(root)!r} is neither a pack (manifest.json.gz) nor the shared data folder; "
                         f"pass {flag} out/packed or {flag} ../shared/data")
    if limit_images is not None:  # a few images per dataset, keeping every dataset represented
        by_ds: dict[str, list[InstanceRecord]] = {}
        for r in recs:
            by_ds.setdefault(r.dataset, []).append(r)
        recs = [r for rs in by_ds.values() for r in rs[:limit_images]]
    empty = [d for d in datasets or [] if d not in {r.dataset for r in recs}]
    if recs and empty:  # named, known, but nothing of it in this split: it was left out of the table silently
        option = flag.replace("data", "datasets")  # --datasets, or engine retrain's --eval-datasets
        note = " (coco128 of the shared data has a train split only)" if "coco128" in empty else ""
        raise InputError(f"dataset(s) {', '.join(empty)} in {option} have no {split!r} images in {str(root)!r}"
                         f"{note}; drop them from {option}, or pick another split")
    if not recs:
        raise InputError(f"no {split!r} records found in {str(root)!r} for datasets {datasets or 'all'}; a pack of "
                         "your own data holds images out for eval only with --val-fraction > 0 and 2 images or "
                         "more: repack with `segany data pack ... --val-fraction 0.1`")
    return recs


def run_evaluation(model: Any, records: list[InstanceRecord], *, max_clicks: int = 20, max_objects_per_image: int | None = 8,
                   grabcut: bool = False, grabcut_workers: int = 1, out_dir: str | os.PathLike[str] | None = None,
                   progress: Callable[[str, int], Callable[[int], None]] | None = None,
                   meta: dict[str, Any] | None = None,
                   predictor_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (and GrabCut) on the same objects; write ``results.json`` and a plot to ``out_dir``.

    ``predictor_options`` go to ``SamPredictor`` (precision, quantize) and are recorded in the meta.
    """
    from segany.eval.interactive import eval_objects, evaluate_model, summarize

    objects = eval_objects(records, max_objects_per_image)
    n_obj = sum(len(m) for _, m in objects)
    check_objects(n_obj, len(records))
    t0 = time.time()
    res = evaluate_model(model, objects, max_clicks=max_clicks,
                         progress=progress("model", n_obj) if progress else None,
                         predictor_options=predictor_options)
    t_model = time.time() - t0
    result: dict[str, Any] = {"meta": {**(meta or {}), "predictor": dict(predictor_options or {}),
                                       "images": len(objects), "objects": n_obj,
                                       "max_clicks": max_clicks, "max_objects_per_image": max_objects_per_image,
                                       "model_seconds": round(t_model, 1)},
                              "model": summarize(res, max_clicks)}
    if grabcut:
        from segany.eval.grabcut import evaluate_grabcut

        t0 = time.time()
        gc = evaluate_grabcut(objects, workers=grabcut_workers,
                              progress=progress("grabcut", n_obj) if progress else None)
        result["grabcut"] = summarize(gc, max_clicks)
        result["meta"]["grabcut_seconds"] = round(time.time() - t0, 1)
        result["box_vs_grabcut"] = compare_box(res, gc)
    result["per_object"] = {"model": [_object_row(r) for r in res]}
    if grabcut:
        result["per_object"]["grabcut"] = [_object_row(r) for r in gc]
    if out_dir is not None:
        from segany.eval.plots import plot_miou_vs_clicks

        out = Path(out_dir)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        with writing(out / "results.json"):
            atomic_write_json(out / "results.json", result, indent=1)
        with writing(out / "miou_vs_clicks.png"):
            plot_miou_vs_clicks(result["model"], out / "miou_vs_clicks.png", baseline=result.get("grabcut"),
                                title=f"{(meta or {}).get('model', 'model')}: mIoU vs clicks (★ box prompt; dashed: GrabCut box)")
    return result


def check_objects(n_objects: int, n_images: int, min_area: int = 64) -> None:
    """Refuse, before anything is evaluated or written, data that leaves no object to evaluate: the tables
    and the plot had nothing to show and the run failed after writing a results.json of 0 objects."""
    if n_objects == 0:
        raise InputError(f"the {n_images} image(s) to evaluate have no object of at least {min_area} px, so there is "
                         "nothing to evaluate; pass data with larger objects, or another --split or --datasets")


def _object_row(r: Any) -> dict[str, Any]:
    row = {"dataset": r.dataset, "image_id": r.image_id, "object": r.index, "box_iou": round(r.box_iou, 4)}
    if r.click_ious:
        row["click_ious"] = [round(v, 4) for v in r.click_ious]
    return row


def compare_box(model: Sequence[Any], grabcut: Sequence[Any], *, resamples: int = 10_000) -> dict[str, Any]:
    """Per dataset and overall: box IoU of the model minus GrabCut's on the same objects, with a 95%
    image-level bootstrap interval, so "above GrabCut" is a claim with an error bar, not two means."""
    from segany.eval.interactive import by_dataset
    from segany.eval.metrics import paired_bootstrap

    if len(model) != len(grabcut) or any((a.dataset, a.image_id) != (b.dataset, b.image_id)
                                         for a, b in zip(model, grabcut, strict=True)):
        raise ValueError("model and GrabCut results must list the same objects in the same order")
    out = {}
    for name, pairs in by_dataset(list(zip(model, grabcut, strict=True)), lambda p: p[0].dataset).items():
        stats = paired_bootstrap([m.box_iou - g.box_iou for m, g in pairs],
                                 [(m.dataset, m.image_id) for m, _ in pairs], resamples=resamples)
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: per dataset, the model's 1/5-click mIoU, NoC@85/90, box mIoU and GrabCut's."""
    gc = result.get("grabcut")  # its column only when GrabCut ran (--grabcut)
    curves = [len(v.get("miou_by_clicks", [])) for v in result["model"].values()]
    later = f"{min(5, max(curves, default=5)) or 5}-click"  # miou_5 is the last click's when fewer ran
    cap = max(curves, default=20)
    noc = "NoC" if cap == 20 else f"NoC{cap}"  # the cap shows when it is not the usual 20 clicks
    two = later != "1-click"  # with --max-clicks 1 the second column was the first again
    head = f"{'dataset':10s} {'objects':>7s} {'1-click':>8s}" + (f" {later:>8s}" if two else "") + \
           f" {noc + '@85':>7s} {noc + '@90':>7s} " \
           f"{'NoF@85':>7s} {'NoF@90':>7s} {'box':>7s}" + (f" {'GrabCut':>8s}" if gc is not None else "")
    lines = [head, "-" * len(head)]
    for name, s in result["model"].items():
        line = (f"{name:10s} {s['objects']:7d} {s.get('miou_1', float('nan')):8.3f}"
                + (f" {s.get('miou_5', float('nan')):8.3f}" if two else "") + f" {s.get('noc85', float('nan')):7.2f} "
                f"{s.get('noc90', float('nan')):7.2f} {s.get('nof85', -1):7d} {s.get('nof90', -1):7d} "
                f"{s['box_miou']:7.3f}")
        if gc is not None:
            g = gc.get(name, {}).get("box_miou")
            line += f" {g if g is not None else float('nan'):8.3f}"
        lines.append(line)
    for name, c in result.get("box_vs_grabcut", {}).items():
        lines.append(f"box mIoU − GrabCut, {name}: {c['mean']:+.3f} (95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, "
                     f"images resampled; better on {c['a_better']:.0%} of {c['objects']} objects)")
    return "\n".join(lines)
