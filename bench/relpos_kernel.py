"""The fused rel-pos attention kernel alone, at the ViT global blocks' shapes, against SDPA.

Times, per global-attention call at encoder batch 8 (median of ``triton.testing.do_bench``):

* ``sdpa_mask``: what ``attention="mask"`` does: build the padded (L, L) bias, then SDPA with it;
* ``fused``: :func:`segany.kernels.relpos_attention.relpos_attention`;
* ``sdpa_no_bias``: SDPA without any bias, a flash-kernel floor no rel-pos method can beat;

and the fused kernel's error against fp32 maths. One line per shape, plus JSON.

Usage::

    python bench/relpos_kernel.py --json out/relpos_kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segany.cli._util import atomic_write_bytes  # noqa: E402
from segany.fast import _padded_bias  # noqa: E402
from segany.kernels.relpos_attention import relpos_attention  # noqa: E402

# (name, heads, head size) of the global blocks of ViT-B, -L and -H at 1024 px (a 64 × 64 token grid).
SHAPES = (("vit_b", 12, 64), ("vit_l", 16, 64), ("vit_h", 16, 80))


def timed_ms(fn: Any, device: str) -> float:
    """Median milliseconds per call: CUDA events through Triton's do_bench, or a host clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_shape(name: str, nh: int, D: int, batch: int, grid: int, device: str = "cuda") -> dict[str, Any]:
    H = W = grid
    L = H * W
    # bf16 on the GPU; fp16 on the CPU smoke run (Triton's interpreter cannot multiply bf16).
    dt = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, nh, L, D, device=device, generator=g, dtype=dt) for _ in range(3))
    bias_h = torch.randn(batch, nh, L, H, device=device, generator=g, dtype=dt)
    bias_w = torch.randn(batch, nh, L, W, device=device, generator=g, dtype=dt)
    bias_h_t = bias_h.transpose(-1, -2).contiguous().transpose(-1, -2)  # queries contiguous (the encoder's until 2026-11-26)
    flops = 4 * batch * nh * L * L * D  # q·kᵀ and p·v
    res: dict[str, Any] = {"model": name, "batch": batch, "heads": nh, "head_dim": D, "tokens": L}
    fns = {
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=_padded_bias(bias_h, bias_w)),
        "fused": lambda: relpos_attention(q, k, v, bias_h, bias_w, (H, W)),  # the encoder's layout, (L, H) rows
        "fused_bias_h_t": lambda: relpos_attention(q, k, v, bias_h_t, bias_w, (H, W)),  # measured 1-13% slower
        "sdpa_no_bias": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    for label, fn in fns.items():
        try:
            ms = timed_ms(fn, device)
            res[label] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as exc:  # noqa: BLE001 - a failing variant is data
            res[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if "ms" in res["fused"] and "ms" in res["sdpa_mask"]:
        res["speedup_vs_mask"] = round(res["sdpa_mask"]["ms"] / res["fused"]["ms"], 2)
        n = min(batch, 2)  # the fp32 check on part of the batch keeps memory modest
        bias = (bias_h[:n, :, :, :, None].float() + bias_w[:n, :, :, None, :].float()).reshape(n, nh, L, L)
        ref = F.scaled_dot_product_attention(q[:n].float(), k[:n].float(), v[:n].float(), attn_mask=bias)
        got = relpos_attention(q[:n], k[:n], v[:n], bias_h[:n], bias_w[:n], (H, W)).float()
        mask = F.scaled_dot_product_attention(q[:n], k[:n], v[:n], attn_mask=_padded_bias(bias_h[:n], bias_w[:n]))
        res["max_abs_err_fused"] = round(float((got - ref).abs().max()), 5)
        res["max_abs_err_sdpa_mask"] = round(float((mask.float() - ref).abs().max()), 5)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=64, help="token grid side (64 for 1024 px inputs)")
    p.add_argument("--models", default="vit_b,vit_l,vit_h")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (timings meaningless)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the kernel's CPU check is tests/kernels/, under Triton's interpreter)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("--device cpu runs the kernel under Triton's interpreter: set TRITON_INTERPRET=1")
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    out = {"gpu": gpu, "torch": torch.__version__, "results": []}
    for name, nh, D in SHAPES:
        if name in wanted:
            r = bench_shape(name, nh, D, args.batch, args.grid, args.device)
            out["results"].append(r)
            print(json.dumps(r), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
