"""Where the fast encoder's time goes: torch.profiler over a few batches, kernels grouped by kind.

``bench/speed.py`` says how fast each variant is; this says why, so the next change to the encoder aims at
the largest share (GEMMs, attention, the rel-pos bias, norms and elementwise work, copies). It prints
the top kernels and the share per kind and writes them as JSON.

Usage::

    python bench/profile_encoder.py --device cuda --model vit_b --attention flex --json out/profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segany.checkpoints import build_sam  # noqa: E402
from segany.cli._util import atomic_write_bytes  # noqa: E402
from segany.fast import ATTENTIONS, FastPath  # noqa: E402

# Substrings of kernel names, first match wins; order matters (an attention kernel may mention "gemm").
KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn", "flex", "cudnn_generated")),
    ("gemm", ("gemm", "addmm", "bmm", "sm90_xmma", "cutlass", "matmul", "mm_", "nvjet")),
    ("copy", ("copy", "cat", "pad", "index", "gather", "transpose")),
    ("norm/elementwise", ("norm", "elementwise", "gelu", "triton", "reduce", "add", "mul", "softmax")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile(model_name: str, attention: str, batch: int, iters: int, device: str, compile_mode: str | None
            ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_sam(model_name).to(device).eval()
    fp = FastPath(model, precision="bf16", attention=attention, compile=compile_mode or False)
    s = model.img_size
    x = torch.randn(batch, 3, s, s, device=device, dtype=fp.dtype)
    with torch.inference_mode():
        for _ in range(3):
            fp._encode_fn(x)
        if device == "cuda":
            torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(iters):
                fp._encode_fn(x)
            if device == "cuda":
                torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = ev.device_time_total if device == "cuda" else ev.self_cpu_time_total
        if device == "cuda" and getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if t > 0:
            rows.append((ev.key, t / iters, ev.count // iters))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    by_kind: dict[str, float] = defaultdict(float)
    for name, t, _ in rows:
        by_kind[kind_of(name)] += t
    return {
        "model": model_name, "attention": attention, "batch": batch, "compile": compile_mode,
        "device_ms_per_batch": round(total / 1000, 3),
        "share": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"kernel": n[:160], "ms": round(t / 1000, 3), "calls": c, "kind": kind_of(n)}
                for n, t, c in rows[:25]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="vit_b")
    p.add_argument("--attention", default="mask", help="comma-separated: " + ", ".join(ATTENTIONS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--compile-mode", default=None, help="also torch.compile the encoder in this mode")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = []
    for att in [a for a in args.attention.split(",") if a]:
        if att not in ATTENTIONS:
            p.error(f"unknown attention mode {att!r}; known: {', '.join(ATTENTIONS)}")
        try:
            r = profile(args.model, att, args.batch, args.iters, args.device, args.compile_mode)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            r = {"attention": att, "error": f"{type(exc).__name__}: {exc}"[:300]}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "top"}), flush=True)
        for row in r.get("top", [])[:12]:
            print(f"    {row['ms']:8.3f} ms  x{row['calls']:<4} {row['kind']:<17} {row['kernel'][:90]}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(results, indent=1).encode())
    return 0


if __name__ == "__main__":
    code = main()
    # Leave at once: the JSON is written. After a max-autotune compile the interpreter's exit waited on
    # Inductor's compile workers until the device call's step limit killed it (rc 124 on 2026-11-26,
    # with complete results), minutes of a scarce GPU call spent doing nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
