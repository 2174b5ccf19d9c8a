"""Predictor speed: segany vs the reference implementation, in one process, on the same weights.

    .venv/bin/python bench/predictor.py                      # ViT-B on CPU, 3 repeats
    .venv/bin/python bench/predictor.py --device cuda --repeats 10 --json out/bench_predictor.json
    .venv/bin/python bench/predictor.py --model vit_t        # MobileSAM oracle (pip install mobilesam-mirror timm)

Measures ``set_image`` (image encoder + preprocessing) and ``predict`` (one click, multimask, back to
the original size) per prompt, plus ``predict_torch`` with many boxes at once, and prints the ratio
reference / segany (> 1 means segany is faster). Both run alternately, so background load hits both
alike; the median of the repeats is reported. Weights are the reference builder's seeded random
init, copied into segany with strict loading, and outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "segany" / "assets" / "sample.jpg"


def reference_model(name: str) -> tuple[torch.nn.Module, Any]:
    """The oracle model and its SamPredictor class (segment_anything, or mobile_sam for vit_t)."""
    if name == "vit_t":
        import mobile_sam as ref_pkg  # pip install mobilesam-mirror timm
    else:
        import segment_anything as ref_pkg
    if name not in ref_pkg.sam_model_registry:
        sys.exit(f"bench: the reference has no model {name!r}; choose from {sorted(ref_pkg.sam_model_registry)}")
    return ref_pkg.sam_model_registry[name](), ref_pkg.SamPredictor


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b", help="vit_b (default), vit_l, vit_h or vit_t")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=3, help="timed set_image calls per implementation")
    ap.add_argument("--prompts", type=int, default=20, help="timed single-click predict calls per implementation")
    ap.add_argument("--boxes", type=int, default=64, help="boxes in the batched predict_torch call")
    ap.add_argument("--image", default=str(SAMPLE))
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench: --device cuda asked for but CUDA is not available")

    from segany.data.images import load_image
    from segany.modeling.sam import Sam
    from segany.predictor import SamPredictor
    from segany.registry import get_config

    torch.manual_seed(0)
    ref_model, RefPredictor = reference_model(args.model)
    ours_model = Sam(get_config(args.model))
    ours_model.load_state_dict(ref_model.state_dict(), strict=True)
    ref_model.to(args.device).eval()  # eval after loading (MobileSAM caches attention biases there)
    ours_model.to(args.device).eval()
    preds = {"segany": SamPredictor(ours_model), "reference": RefPredictor(ref_model)}
    image = load_image(args.image)
    h, w = image.shape[:2]
    print(f"bench: {args.model} on {args.device}, image {w}x{h}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    # Warm up (allocator, kernels, lazy init) and check both compute the same thing.
    for p in preds.values():
        p.set_image(image)
    emb_diff = float((preds["segany"].features.float() - preds["reference"].features.float()).abs().max())
    print(f"bench: embedding max abs diff {emb_diff:.2e}", file=sys.stderr)

    set_image: dict[str, list[float]] = {k: [] for k in preds}
    for r in range(args.repeats):
        order = list(preds) if r % 2 == 0 else list(preds)[::-1]
        for k in order:
            set_image[k].append(timed(lambda p=preds[k]: p.set_image(image), args.device))
            print(f"bench: set_image {k} #{r + 1}: {set_image[k][-1]:.3f} s", file=sys.stderr)

    rng = np.random.default_rng(0)
    clicks = rng.uniform(0, 1, (args.prompts, 1, 2)) * [w, h]
    predict: dict[str, list[float]] = {k: [] for k in preds}
    for p in preds.values():
        p.predict(clicks[0], np.array([1]))  # warm-up
    for i, xy in enumerate(clicks):
        for k in (list(preds) if i % 2 == 0 else list(preds)[::-1]):
            predict[k].append(timed(lambda p=preds[k], xy=xy: p.predict(xy, np.array([1])), args.device))

    x0 = rng.uniform(0, 0.6, args.boxes) * w
    y0 = rng.uniform(0, 0.6, args.boxes) * h
    boxes = np.stack([x0, y0, x0 + 0.3 * w, y0 + 0.3 * h], axis=1)
    boxes_t = preds["reference"].transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32), (h, w))
    boxes_t = boxes_t.to(args.device)
    batched: dict[str, list[float]] = {k: [] for k in preds}
    for _ in range(max(1, args.repeats)):
        for k, p in preds.items():
            batched[k].append(timed(lambda p=p: p.predict_torch(None, None, boxes=boxes_t, multimask_output=False),
                                    args.device))

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "n": len(values)}

    results = {k: {"set_image_s": summary(set_image[k]), "predict_ms_per_prompt":
                   {m: v * 1000 for m, v in summary(predict[k]).items() if m != "n"} | {"n": len(predict[k])},
                   "batched_boxes_ms_per_prompt": {m: v * 1000 / args.boxes for m, v in summary(batched[k]).items()
                                                   if m != "n"}} for k in preds}
    ratios = {
        "set_image": results["reference"]["set_image_s"]["median"] / results["segany"]["set_image_s"]["median"],
        "predict": results["reference"]["predict_ms_per_prompt"]["median"]
        / results["segany"]["predict_ms_per_prompt"]["median"],
        "batched_boxes": results["reference"]["batched_boxes_ms_per_prompt"]["median"]
        / results["segany"]["batched_boxes_ms_per_prompt"]["median"],
    }
    report = {
        "model": args.model, "device": args.device, "image_wh": [w, h], "repeats": args.repeats,
        "prompts": args.prompts, "boxes": args.boxes, "embedding_max_abs_diff": emb_diff,
        "machine": machine(args.device), "results": results, "ratio_reference_over_segany": ratios,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }

    rows = [
        ("set_image (s, median)", "set_image_s", 1.0, "{:.3f}", "set_image"),
        ("predict per prompt (ms, median)", "predict_ms_per_prompt", 1.0, "{:.1f}", "predict"),
        (f"predict_torch, {args.boxes} boxes (ms/prompt)", "batched_boxes_ms_per_prompt", 1.0, "{:.2f}",
         "batched_boxes"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{args.model} on {args.device} ({report['machine']['cpu']}, torch {torch.__version__})")
    print(f"{'':{width}}  {'segany':>10}  {'reference':>10}  {'ref/segany':>10}")
    for label, key, _, fmt, rkey in rows:
        ours, ref = results["segany"][key]["median"], results["reference"][key]["median"]
        print(f"{label:{width}}  {fmt.format(ours):>10}  {fmt.format(ref):>10}  {ratios[rkey]:>9.2f}x")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
