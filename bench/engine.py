"""Stage-3 throughput: images/hour of `segany engine auto` on one machine with 1, 2, 4 workers.

    .venv/bin/python bench/engine.py [--model segany_tiny|--tiny] [--images 8] [--workers 1,2,4]
                                     [--points-per-side 16] [--device cpu|cuda] [--json out.json]

Each setting runs the full stage-3 path (worker processes → driver → SQLite store) on a fresh project of
copies of the bundled samples; model load and process start-up are excluded by timing from the first
result. ``--tiny`` uses the depth-2 test model (random weights) for a quick CPU check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="segany_tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--tiny", action="store_true", help="the depth-2 test model with random weights")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "engine")]
    from engine_fixtures import make_images, make_project, save_tiny_checkpoint

    from segany.engine.auto import AutoSettings, ModelSpec, run_auto
    from segany.engine.retrain import model_spec_for

    tmp = Path(tempfile.mkdtemp(prefix="segany-bench-engine-"))
    images = make_images(tmp / "images", args.images)
    if args.tiny:
        spec = ModelSpec("vit_b", str(save_tiny_checkpoint(tmp / "tiny.pt")), args.device)
    else:
        store, _ = make_project(tmp / "probe", images[:1])
        spec = model_spec_for(store, None, model=args.model, checkpoint=args.checkpoint, device=args.device)
        store.close()
    # Random weights keep almost nothing at the default thresholds; keep the post-processing load realistic.
    random = spec.checkpoint is None or args.tiny
    settings = AutoSettings(points_per_side=args.points_per_side, pred_iou_thresh=0.0 if random else 0.88,
                            stability_score_thresh=0.0 if random else 0.95, max_masks=100)
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        store, _ = make_project(tmp / f"w{n}", images)
        first: list[float] = []
        t0 = time.perf_counter()

        def on_result(result, written, first=first) -> None:
            if not first:
                first.append(time.perf_counter())

        s = run_auto(store, None, spec, settings, workers=n, on_result=on_result)
        end = time.perf_counter()
        steady = (args.images - 1) / (end - first[0]) * 3600 if args.images > 1 else float("nan")
        rows.append({"workers": n, "images": s.images_written, "masks": s.masks_written,
                     "wall_s": round(end - t0, 1), "startup_s": round(first[0] - t0, 1),
                     "images_per_hour": round(steady, 1),
                     "seconds_per_image_per_worker": round(s.worker_seconds / max(1, s.images_written), 2)})
        print(json.dumps(rows[-1]), flush=True)
        store.close()
    out = {"model": spec.version_name(), "device": args.device, "points_per_side": args.points_per_side,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)  # one project per worker count: too big to leave in /tmp
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
