"""Interleaved A/B timings of two CPU click settings, for machines too noisy for back-to-back runs.

A shared or virtual CPU drifts by ±10% from one minute to the next, so separate runs of ``bench/speed.py``
cannot resolve a 5% change. This script alternates the two settings instead:

* ``post``: OpenCV post-processing (``segany.cpu_upscale``) against torch's ``interpolate``, click by
  click in one process (the same model, embedding and allocator).
* ``alloc``: the glibc allocator tuning (``segany.cpu_alloc``) on and off. It is process-wide, so each
  sample is one child process timing ``--clicks`` clicks, and children alternate on/off in pairs whose
  order flips every pair; the figure is the median of the paired differences.

Both use the folded-decoder fp32 fast path (what ``--precision auto`` runs on CPUs without bf16), random
weights and a random embedding for a 768×1024 frame, one positive point, masks as returned to the user.

    .venv/bin/python bench/cpu_click_ab.py --model vit_b --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

FRAME_HW = (768, 1024)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/speed.py's helpers


def _predictor(model_name: str) -> Any:
    import torch
    from speed import set_embedding

    from segany import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry[model_name]()
    pred = SamPredictor(sam, precision="fp32", fast_decoder=True)
    features = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    set_embedding(pred, features, pred.transform.get_preprocess_shape(*FRAME_HW, sam.img_size), FRAME_HW)
    return pred


def _click(pred: Any) -> float:
    import numpy as np

    t = time.perf_counter()
    pred.predict(np.array([[500, 300]]), np.array([1]))
    return time.perf_counter() - t


def child(model_name: str, clicks: int) -> None:
    """One allocator sample: the median click of this process, printed as JSON."""
    import resource

    pred = _predictor(model_name)
    for _ in range(5):
        _click(pred)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [_click(pred) for _ in range(clicks)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / clicks
    print(json.dumps({"ms": 1000 * statistics.median(times), "faults_per_click": faults}))


def post_ab(model_name: str, clicks: int) -> dict[str, Any]:
    from segany import cpu_upscale

    pred = _predictor(model_name)
    real = cpu_upscale.applies
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(2 * clicks + 10):
            on = i % 2 == 0
            cpu_upscale.applies = real if on else (lambda *a, **k: False)  # type: ignore[assignment]
            dt = _click(pred)
            if i >= 10:
                times[on].append(dt)
    finally:
        cpu_upscale.applies = real  # type: ignore[assignment]
    torch_ms, cv_ms = (1000 * statistics.median(times[k]) for k in (False, True))
    return {"interpolate_ms": round(torch_ms, 2), "opencv_ms": round(cv_ms, 2), "saved_ms": round(torch_ms - cv_ms, 2),
            "clicks_each": clicks}


def alloc_ab(model_name: str, clicks: int, pairs: int, threads: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for i in range(pairs):
        for setting in (("off", "on") if i % 2 == 0 else ("on", "off")):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env["SEGANY_MALLOC_TUNING"] = "1" if setting == "on" else "0"
            env["OMP_NUM_THREADS"] = str(threads)
            out = subprocess.run([sys.executable, __file__, "--child", "--model", model_name, "--clicks", str(clicks),
                                  "--threads", str(threads)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  alloc {setting}: {runs[setting][-1]['ms']:.1f} ms", flush=True)
    diffs = [a["ms"] - b["ms"] for a, b in zip(runs["off"], runs["on"], strict=True)]
    return {"off_ms": [round(r["ms"], 2) for r in runs["off"]], "on_ms": [round(r["ms"], 2) for r in runs["on"]],
            "paired_saved_ms_median": round(statistics.median(diffs), 2),
            "on_faster_pairs": f"{sum(d > 0 for d in diffs)}/{pairs}",
            "faults_per_click_off": round(statistics.median(r["faults_per_click"] for r in runs["off"])),
            "faults_per_click_on": round(statistics.median(r["faults_per_click"] for r in runs["on"])),
            "clicks_per_sample": clicks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--clicks", type=int, default=100, help="clicks per setting (post) or per child (alloc)")
    p.add_argument("--pairs", type=int, default=8, help="on/off child pairs for the allocator")
    p.add_argument("--parts", default="post,alloc", help="comma-separated: post, alloc")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts <= {"post", "alloc"} or not parts:
        p.error(f"--parts takes post and/or alloc, got {args.parts!r}")
    if args.clicks < 1 or args.pairs < 1:
        p.error("--clicks and --pairs must be at least 1")
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        child(args.model, args.clicks)
        return 0
    from speed import machine  # the same machine record as bench/speed.py

    out: dict[str, Any] = {"model": args.model, "machine": machine("cpu")}
    if "post" in parts:
        out["post"] = post_ab(args.model, args.clicks)
        print("post-processing:", out["post"], flush=True)
    if "alloc" in parts:
        out["alloc"] = alloc_ab(args.model, args.clicks, args.pairs, args.threads)
        print("allocator:", out["alloc"], flush=True)
    if args.json:
        from segany.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
