"""`segany engine auto|retrain|versions|report PROJECT`: data-engine stage 3, the retraining loop, dataset
versions, maintenance reports.

    segany engine auto PROJECT [--workers 4] [--ray local|ADDRESS]   automatic masks for images not done yet
    segany engine retrain PROJECT --steps 200                         freeze data, fine-tune, evaluate, register
    segany engine report PROJECT --out report/                        HTML report; --demote: flags to review
    segany engine versions PROJECT [--export-coco VERSION OUT.json]   frozen dataset versions; export one as COCO

`engine auto` refuses a plain rerun over images done with other settings (pass --redo to redo them with the
new ones); an interrupted --redo is finished by the next run with the same settings (with or without
--redo). Images that cannot be read are skipped, listed, and make the exit status 1; rerun after fixing them.

PROJECT is a project folder or a database URL (as for `segany project`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("engine", help="data engine: automatic stage, retraining, maintenance reports",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="PROJECT", help="project folder (SQLite inside) or database URL")
    p.add_argument("--project", default=None, help="project name in the store (default: the first one)")
    p.add_argument("--model", default=None,
                   help="registered model (default: the project's current model, else segany_tiny)")
    p.add_argument("--checkpoint", default=None,
                   help="weights file (default: the project's current model, else the model's cached weights)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or auto (default; with --ray, the cluster's GPUs decide, not this machine's)")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="engine_cmd", required=True, metavar="COMMAND")
    a = sub.add_parser("auto", help="stage 3: automatic masks for every image not done yet (resumable)")
    _model_args(a)
    a.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray: 'local' starts a cluster here, else the cluster address (ray://host:10001)")
    a.add_argument("--workers", type=int, default=None,
                   help="model replicas: local processes (default 1) or Ray actors (default one per GPU/CPU)")
    # Unset generator options take the model's defaults (segany.amg.model_defaults): SAM's, or segany_tiny's.
    from segany.amg.model_defaults import default_note

    a.add_argument("--points-per-side", type=int, default=None, help=default_note("points_per_side"))
    a.add_argument("--points-per-batch", type=int, default=None, help=default_note("points_per_batch"))
    a.add_argument("--pred-iou-thresh", type=float, default=None, help=default_note("pred_iou_thresh"))
    a.add_argument("--stability-thresh", type=float, default=None, help=default_note("stability_score_thresh"))
    a.add_argument("--box-nms-thresh", type=float, default=None, help=default_note("box_nms_thresh"))
    a.add_argument("--crop-n-layers", type=int, default=None, help=default_note("crop_n_layers"))
    a.add_argument("--min-area", type=int, default=None, help="remove mask regions and holes below this area ("
                   + default_note("min_mask_region_area") + ")")
    a.add_argument("--max-masks", type=int, default=None, help="keep the best N masks per image")
    a.add_argument("--review", action="store_true", help="store masks as pending review instead of accepted")
    a.add_argument("--redo", action="store_true", help="run again on images already done (replaces their unreviewed automatic masks; masks people "
                        "accepted or rejected stay). Needed to change settings on a project already done")
    a.add_argument("--generator", default="segany.amg:SamAutomaticMaskGenerator", help=argparse.SUPPRESS)
    a.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 on CUDA and on CPUs that multiply bf16 in hardware (AMX, "
                        "AVX512-BF16), fp32 with the folded mask decoder on other CPUs; decided once, by the "
                        "machine that starts the run (with --ray: the cluster's GPUs, else this CPU), for every "
                        "worker. The precision that ran is a setting: a plain rerun where it differs is refused")
    a.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of each worker process or actor, and of this process (default: torch's "
                        "own here; the cores shared out between local workers); not a setting: masks do not "
                        "depend on it")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")

    r = sub.add_parser("retrain", help="freeze a dataset version, fine-tune, evaluate old vs new, register")
    _model_args(r)
    r.add_argument("--steps", type=int, default=200, help="training steps")
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--held-out", type=float, default=None,
                   help="fraction of the project's images kept out of training to evaluate on (default 0.2; none "
                        "with --eval-data)")
    r.add_argument("--eval-data", default=None,
                   help="evaluate on this data instead of the held-out images (a pack or ../shared/data)")
    r.add_argument("--eval-datasets", default=None, help="comma-separated datasets of --eval-data")
    r.add_argument("--eval-images", type=int, default=None, help="at most this many evaluation images")
    r.add_argument("--max-objects", type=int, default=8, help="objects evaluated per image")
    r.add_argument("--freeze-encoder", action="store_true", help="train prompt encoder and decoder only")
    r.add_argument("--always-promote", action="store_true", help="make the new model current even if not better")
    r.add_argument("--min-gain", type=float, default=0.01,
                   help="promote only if the score (mean of 1-click, 5-click and box mIoU) rises by this much "
                        "(default 0.01)")
    r.add_argument("--min-eval-objects", type=int, default=20,
                   help="promote only if at least this many held-out objects were evaluated (default 20)")
    r.add_argument("--out", default=None, help="run folder (default PROJECT/.segany/retrain/<dataset version>-from-<model id>, "
                        "-2, -3... when taken; under the current folder for a database URL). An interrupted retrain "
                        "continues its fine-tuning from the state saved there when run again")
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("versions", help="list the project's frozen dataset versions; export one as COCO")
    v.add_argument("target", metavar="PROJECT", help="project folder (SQLite inside) or database URL")
    v.add_argument("--project", default=None, help="project name in the store (default: the first one)")
    v.add_argument("--export-coco", nargs=2, metavar=("VERSION", "OUT"), default=None,
                   help="write dataset version VERSION (name, id or vN) as a COCO instances file OUT")
    v.add_argument("--json", action="store_true", help="print as JSON")

    m = sub.add_parser("report", help="data maintenance report (HTML) listing masks to check; changes nothing "
                                      "unless --demote")
    _model_args(m)
    m.add_argument("--out", required=True, help="report folder (new, empty, or an earlier report: replaced whole)")
    m.add_argument("--force", action="store_true", help="replace --out's contents even if they are not an "
                   "earlier report")
    m.add_argument("--disagreement-iou", type=float, default=0.5,
                   help="flag accepted masks whose box-prompted model mask has IoU below this")
    m.add_argument("--max-disagreement", type=int, default=500, help="masks checked against the model at most")
    m.add_argument("--dup-iou", type=float, default=0.9, help="mask pairs in one image above this IoU are duplicates")
    m.add_argument("--dup-hash-bits", type=int, default=6, help="images whose 64-bit dHash differ in at most "
                                                                 "this many bits are near-duplicates")
    m.add_argument("--no-model", action="store_true", help="skip the model-vs-annotation disagreement check")
    m.add_argument("--demote", action="store_true", help="also move flagged accepted masks to the review queue "
                   "(pending: out of exports and training until accepted again); by default the report changes "
                   "nothing")


def run(args: argparse.Namespace) -> int:
    from segany.engine.store import open_store

    store = open_store(args.target)
    try:
        return {"auto": _auto, "retrain": _retrain, "report": _report,
                "versions": _versions}[args.engine_cmd](store, args)
    finally:
        store.close()


def _spec(store: Any, args: argparse.Namespace, *, on_ray: bool = False) -> Any:
    """The model to run; on Ray the device stays as asked (cpu, cuda or auto): the cluster's GPUs decide it."""
    from segany.cli._util import resolve_device
    from segany.engine.retrain import model_spec_for

    device = args.device if on_ray else resolve_device(args.device)
    return model_spec_for(store, args.project, model=args.model, checkpoint=args.checkpoint, device=device)


# AutoSettings' fields and the `engine auto` flags that set them, so a refusal names what was typed.
_AUTO_FLAGS = {"points_per_side": "--points-per-side", "points_per_batch": "--points-per-batch",
               "pred_iou_thresh": "--pred-iou-thresh", "stability_score_thresh": "--stability-thresh",
               "box_nms_thresh": "--box-nms-thresh", "crop_n_layers": "--crop-n-layers",
               "min_mask_region_area": "--min-area", "max_masks": "--max-masks"}


def _auto(store: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segany.amg.model_defaults import generator_defaults
    from segany.cli._util import as_flags
    from segany.engine.auto import AutoSettings, run_auto
    from segany.engine.jobs import check_workers

    backend = "ray" if args.ray else "local"
    workers = args.workers if args.workers is not None else (0 if backend == "ray" else 1)
    check_workers(backend, workers)  # before the model, the banner and the bar
    if backend == "ray":
        from segany.engine.jobs import ray_device

        ray_device(args.device, cluster_gpus=1)  # a device name Ray cannot place fails before the model loads
    spec = dataclasses.replace(_spec(store, args, on_ray=backend == "ray"), precision=args.precision)
    d = generator_defaults(spec.model)  # for the options left unset: the model's own scale

    def pick(value: Any, name: str) -> Any:
        return d[name] if value is None else value

    with as_flags(_AUTO_FLAGS):
        settings = AutoSettings(
            points_per_side=pick(args.points_per_side, "points_per_side"),
            points_per_batch=pick(args.points_per_batch, "points_per_batch"),
            pred_iou_thresh=pick(args.pred_iou_thresh, "pred_iou_thresh"),
            stability_score_thresh=pick(args.stability_thresh, "stability_score_thresh"),
            stability_score_offset=d["stability_score_offset"],
            box_nms_thresh=pick(args.box_nms_thresh, "box_nms_thresh"),
            crop_n_layers=pick(args.crop_n_layers, "crop_n_layers"),
            min_mask_region_area=pick(args.min_area, "min_mask_region_area"),
            max_masks=args.max_masks, review_state="pending" if args.review else "accepted", generator=args.generator)
    bar: dict[str, Any] = {}

    def on_start(todo: int, done: int) -> None:
        print(f"[segany] stage 3 with {spec.version_name()} on {backend}: {todo} images to do, {done} already done",
              file=sys.stderr, flush=True)
        bar["t"] = tqdm(total=todo, unit="img", disable=args.quiet, file=sys.stderr)

    def on_result(result: Any, written: bool) -> None:
        bar["t"].update(1)
        bar["t"].set_postfix(masks=len(result.masks))

    summary = run_auto(store, args.project, spec, settings, backend=backend, workers=workers, ray_address=args.ray,
                       redo=args.redo, threads=args.threads, on_start=on_start, on_result=on_result)
    if "t" in bar:
        bar["t"].close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=1))
    else:
        print(_auto_summary_line(summary, backend))
        for f in summary.failures:
            print(f"  image {f['image_id']} skipped: {f['reason']}", file=sys.stderr)
        if summary.kept_other_model:
            print(_kept_other_model_line(summary), file=sys.stderr)
    return 1 if summary.images_failed else 0


def _kept_other_model_line(summary: Any) -> str:
    n = summary.kept_other_model
    return (f"  {_plural(n, 'image')} already done {'keeps' if n == 1 else 'keep'} the masks of "
            f"{summary.other_model}; pass --redo to redo {'it' if n == 1 else 'them'} with this model")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _auto_summary_line(summary: Any, backend: str) -> str:
    failed = f"{summary.images_failed} could not be read (listed below; rerun after fixing them), " \
        if summary.images_failed else ""
    redo = "finished an interrupted --redo: " if summary.resumed_redo else ""
    return (f"stage 3: {redo}{_plural(summary.images_written, 'image')} written "
            f"({_plural(summary.masks_written, 'mask')}), {summary.images_skipped} already done, {failed}"
            f"{summary.duplicates_dropped} duplicate results dropped, {summary.seconds:.1f} s "
            f"({summary.images_per_hour:.0f} images/hour with "
            f"{_plural(summary.workers, 'actor' if backend == 'ray' else 'worker')})")


def _retrain(store: Any, args: argparse.Namespace) -> int:
    from segany.cli._util import resolve_device
    from segany.engine.retrain import RetrainSettings, retrain

    settings = RetrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, held_out=args.held_out,
        eval_data=args.eval_data, eval_datasets=tuple(args.eval_datasets.split(",")) if args.eval_datasets else None,
        eval_images=args.eval_images, max_objects=args.max_objects, freeze_encoder=args.freeze_encoder,
        always_promote=args.always_promote, min_gain=args.min_gain, min_eval_objects=args.min_eval_objects,
        device=resolve_device(args.device))
    result = retrain(store, args.project, settings, model=args.model, checkpoint=args.checkpoint, out_dir=args.out,
                     log=lambda msg: print(f"[segany] {msg}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        o, n = result["metrics_old"]["all"], result["metrics_new"]["all"]
        print(f"dataset version {result['dataset_version']['name']} ({result['dataset_version']['annotations']} "
              f"masks, hash {result['dataset_version']['content_hash'][:12]})")
        print(f"{'':10s} {'1-click':>8s} {'5-click':>8s} {'box':>8s}")
        for name, s in (("old", o), ("new", n)):
            print(f"{name:10s} {s['miou_1']:8.3f} {s['miou_5']:8.3f} {s['box_miou']:8.3f}")
        state = "now current" if result["promoted"] else "not promoted"
        print(f"model version {result['model_version']['name']} (id {result['model_version']['id']}): {state}: "
              f"{result['promotion_reason']}")
    return 0


def _versions(store: Any, args: argparse.Namespace) -> int:
    from segany.engine.versions import export_version_coco, list_versions

    if args.export_coco:
        version, out = args.export_coco
        done = export_version_coco(store, args.project, version, out)
        print(json.dumps(done) if args.json else
              f"wrote {done['path']}: dataset version {done['name']}, {done['annotations']} masks on "
              f"{done['images']} images")
        return 0
    rows = list_versions(store, args.project)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no dataset versions yet (segany engine retrain freezes one)")
    for r in rows if not args.json else []:
        models = ", ".join(r["models"]) or "-"
        print(f"{r['id']:4d}  {r['name']:20s} {r['created_at']}  {r['masks']:6d} masks  {r['images'] or 0:5d} images"
              f"  trained: {models}")
    return 0


def _report(store: Any, args: argparse.Namespace) -> int:
    from pathlib import Path

    from segany.engine.report import ReportSettings, build_report, check_out_dir

    settings = ReportSettings(disagreement_iou=args.disagreement_iou, max_disagreement=args.max_disagreement,
                              dup_iou=args.dup_iou, dup_hash_bits=args.dup_hash_bits, demote=args.demote)
    check_out_dir(Path(args.out))
    spec = None if args.no_model else _spec(store, args)
    out = build_report(store, args.project, args.out, settings, spec=spec, force=args.force,
                       log=lambda msg: print(f"[segany] {msg}", file=sys.stderr, flush=True))
    print(f"wrote {out['html']} ({out['flagged']} masks flagged, "
          + (f"{out['demoted']} sent to the review queue)" if args.demote else "--demote sends them to review)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segany engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
