"""``segany eval --model NAME [--checkpoint PATH] --data DIR [--grabcut]``: held-out interactive evaluation.

Reports, per dataset, mIoU after 1 and 5 clicks, NoC@85/90 (20-click cap) and box-prompt mIoU, with
OpenCV GrabCut from the same boxes beside it (``--grabcut``), and then the model's box mIoU minus GrabCut's
with a 95% interval (paired bootstrap over images). Writes results.json (summaries and every object's IoUs)
and a mIoU-vs-clicks PNG to ``--out``.

``--amg`` instead judges the automatic mask generator: its masks as object proposals, ranked by predicted
IoU, scored by class-agnostic mask AR@10/100/1000 against every annotated instance; writes amg_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from segany.cli._util import add_speed_arguments, comma_list, loaded_model_name, predictor_options
from segany.errors import InputError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model on held-out data (clicks, boxes, GrabCut baseline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="segany_tiny", help="registered model name (default segany_tiny)")
    p.add_argument("--checkpoint", default=None, help="weights file (or the first of its .part files)")
    p.add_argument("--data", required=True, help="a pack folder (scripts/pack_data.py) or ../shared/data")
    p.add_argument("--split", default="val", help="split to evaluate (default val, the held-out images)")
    p.add_argument("--datasets", default=None, help="comma-separated subset, e.g. pennfudan,kvasir")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--max-objects-per-image", type=int, default=8,
                   help="evaluate the N largest objects of each image (default 8; 0: every object, as the "
                        "RITM/SAM protocols do)")
    p.add_argument("--limit-images", type=int, default=None, help="at most this many images per dataset")
    p.add_argument("--grabcut", action="store_true", help="also run the GrabCut-from-box baseline")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes for GrabCut")
    p.add_argument("--device", default="auto", help="auto (default: cuda when there is a GPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--amg", action="store_true",
                   help="evaluate automatic masks as proposals (AR@10/100/1000) instead of clicks and boxes")
    p.add_argument("--points-per-side", type=int, default=16, help="--amg: the generator's point grid (default 16)")
    add_speed_arguments(p, cpu_bf16_auto=False)  # a fast path, same protocol; auto stays exact on CPU
    p.add_argument("--out", default="runs/eval", help="folder for results.json and miou_vs_clicks.png")
    p.add_argument("--quiet", action="store_true")


def _check_arguments(args: argparse.Namespace) -> None:
    """Options that cannot give a result fail here, before the model loads or anything is written."""
    from segany.cli._checks import check_out_dir

    for flag, value in (("--max-clicks", args.max_clicks), ("--limit-images", args.limit_images),
                        ("--workers", args.workers)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if args.max_objects_per_image < 0:
        raise InputError(f"--max-objects-per-image must be 0 (every object) or more, got {args.max_objects_per_image}")
    check_out_dir(args.out, "--out")
    if args.out:  # its plot is drawn after the whole evaluation: hours lost, and no table, had it failed then
        from segany.errors import require

        require("matplotlib", "train")


def _bar(quiet: bool, unit: str = "obj") -> Any:
    def make(desc: str, total: int) -> Any:
        if quiet:
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0)
        return bar.update
    return make


def run(args: argparse.Namespace) -> int:
    if args.amg:  # checked before torch loads (seconds): a wrong option fails at once
        if args.points_per_side < 1:
            raise InputError(f"--points-per-side must be at least 1, got {args.points_per_side}")
        if args.grabcut:
            raise InputError("--grabcut is the baseline for box prompts and does not apply to --amg; drop one of them")

    from segany.bundled import resolve_parts
    from segany.checkpoints import build_sam, find_weights
    from segany.cli._util import resolve_device
    from segany.eval.run import format_table, load_eval_records, run_evaluation
    from segany.registry import weights_for_model

    device = resolve_device(args.device)  # a wrong name or a missing GPU is one line, as in predict/auto/train
    # A combination that cannot run fails before anything loads.
    options = predictor_options(args, device, cpu_bf16_auto=False)
    _check_arguments(args)
    ckpt = resolve_parts(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        info = weights_for_model(args.model)
        ckpt = find_weights(info.name) if info else None
        if ckpt is None:
            from segany.errors import CheckpointError

            raise CheckpointError(f"no weights found for {args.model!r}; pass --checkpoint PATH")
    # Records before the model: a wrong --data, --split or --datasets fails in a second.
    datasets = comma_list(args.datasets) if args.datasets else None
    records = load_eval_records(args.data, args.split, datasets, args.limit_images)
    model = build_sam(args.model, checkpoint=ckpt, device=device).float()
    # A checkpoint embeds its architecture: the results name what was evaluated, as predict's and auto's do.
    model_name = loaded_model_name(model.cfg, args.model, ckpt)
    if model_name != args.model:
        print(f"segany: note: {ckpt} holds {model_name}, not {args.model}: that is what is evaluated",
              file=sys.stderr)
    from segany.eval.run import provenance

    meta = {"model": model_name, "checkpoint": str(ckpt), "data": str(args.data), "split": args.split,
            "device": device, "provenance": provenance(ckpt, records, args.split)}
    if args.amg:
        return _run_amg(args, model, records, meta, options)
    result = run_evaluation(model, records, max_clicks=args.max_clicks,
                            max_objects_per_image=args.max_objects_per_image or None, grabcut=args.grabcut,
                            grabcut_workers=args.workers, out_dir=args.out, progress=_bar(args.quiet),
                            meta=meta, predictor_options=options)
    print(format_table(result))
    print(f"results: {os.path.join(args.out, 'results.json')}  plot: {os.path.join(args.out, 'miou_vs_clicks.png')}")
    if not args.quiet:
        print(json.dumps(result["meta"]), file=sys.stderr)
    return 0


def _run_amg(args: argparse.Namespace, model: Any, records: Any, meta: dict[str, Any],
             options: dict[str, Any]) -> int:
    from pathlib import Path

    from segany.cli._util import atomic_write_bytes
    from segany.eval.amg import AmgEvalSettings, evaluate_amg, format_amg_table
    from segany.eval.interactive import eval_objects
    from segany.eval.run import writing

    n_images = len(eval_objects(records, max_objects_per_image=None))
    bar = _bar(args.quiet, unit="img")("amg", n_images)
    result = evaluate_amg(model, records, AmgEvalSettings(points_per_side=args.points_per_side),
                          predictor_options=options, progress=bar)
    result = {"meta": {**meta, "predictor": options}, **result}
    out = Path(args.out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with writing(out / "amg_results.json"):
        atomic_write_bytes(out / "amg_results.json", json.dumps(result, indent=1).encode())
    print(format_amg_table(result))
    print(f"results: {out / 'amg_results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segany eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
