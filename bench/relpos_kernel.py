"""The fused rel-pos attention kernels alone, at the ViT blocks' shapes, against SDPA.

Global blocks, per attention call at encoder batch 8 (median of ``triton.testing.do_bench``):

* ``sdpa_mask``: what ``attention="mask"`` does: build the padded (L, L) bias, then SDPA with it;
* ``fused``: :func:`segany.kernels.relpos_attention.relpos_attention`;
* ``sdpa_no_bias``: SDPA without any bias, a flash-kernel floor no rel-pos method can beat;

Windowed blocks (14-token windows), from the ``qkv`` projection to the tokens ``proj`` takes:

* ``fold``: what the windowed blocks did before the window kernel: pad and partition, add the qkv bias,
  the rel-pos einsums, SDPA on the folded heads, merge and crop;
* ``fused``: :func:`segany.kernels.window_attention.window_attention` as the encoder runs it (the flash
  kernel: a key row a step, online softmax);
* ``sdpa_no_bias_windows``: SDPA on already-partitioned windows without bias (a floor for the attention
  itself; the other two also move the tokens in and out of windows);

and each kernel's error against fp32 maths. One line per shape, plus JSON. For the window kernel the JSON
also keeps Triton's autotuner timings of every tile config it tried (``fused_autotune``, ms), and
``--extra-window-configs`` adds more candidates to that search (``fused_extended``: the time and error of
the kernel with the pick among all of them), to find a better tile without rebuilding the package, and
``fused_forced`` times the search's three fastest tiles again, each alone, as the bench times the kernel.
``terms`` says how the kernel read its rel-pos terms (``window_attention.TERMS``), and ``fused_gather``
(or ``fused_select``) times the other way in the same process, with its own search and error.

Usage::

    python bench/relpos_kernel.py --json out/relpos_kernel.json
"""

from __future__ import annotations

import argparse
import copy
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
from segany.fast import FastViTAttention, FastWindowBlock, _padded_bias  # noqa: E402
from segany.kernels import relpos_attention as relpos_kernel  # noqa: E402
from segany.kernels import window_attention as window_kernel  # noqa: E402
from segany.kernels.relpos_attention import relpos_attention  # noqa: E402
from segany.modeling import image_encoder as vit  # noqa: E402
from segany.modeling.config import ViTConfig  # noqa: E402

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


def time_variants(fns: dict[str, Any], flops: int, device: str) -> dict[str, Any]:
    """Each variant's median ms and TFLOP/s; a variant that fails is recorded with its error, not raised."""
    res: dict[str, Any] = {}
    for label, fn in fns.items():
        try:
            ms = timed_ms(fn, device)
            res[label] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as exc:  # noqa: BLE001 - a failing variant is data
            res[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return res


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
    res.update(time_variants(fns, flops, device))
    if "ms" in res["fused"] and "ms" in res["sdpa_mask"]:
        res["speedup_vs_mask"] = round(res["sdpa_mask"]["ms"] / res["fused"]["ms"], 2)
        n = min(batch, 2)  # the fp32 check on part of the batch keeps memory modest
        bias = (bias_h[:n, :, :, :, None].float() + bias_w[:n, :, :, None, :].float()).reshape(n, nh, L, L)
        ref = F.scaled_dot_product_attention(q[:n].float(), k[:n].float(), v[:n].float(), attn_mask=bias)
        got = relpos_attention(q[:n], k[:n], v[:n], bias_h[:n], bias_w[:n], (H, W)).float()
        mask = F.scaled_dot_product_attention(q[:n], k[:n], v[:n], attn_mask=_padded_bias(bias_h[:n], bias_w[:n]))
        res["max_abs_err_fused"] = round(float((got - ref).abs().max()), 5)
        res["max_abs_err_sdpa_mask"] = round(float((mask.float() - ref).abs().max()), 5)
        kernel = getattr(relpos_kernel, "_relpos_attention_kernel", None)
        if device == "cuda" and kernel is not None:  # which tile won (KR = 2 rows a step, or 1), and by how much
            res["fused_autotune"] = _autotune_timings(kernel)
    return res


# Tile configs beyond the kernel's own list (segany.kernels.window_attention._configs), as
# (BLOCK_M, KR key rows a step, warps, pipeline stages). The search of 2026-11-27 23:40 (H200) put its
# winners into that list; these are the next neighbours of those winners (more stages, 4 warps at 128
# rows, wider key tiles) and one of the old list's dropped tiles, to show the new list still beats it.
EXTRA_WINDOW_CONFIGS = ((64, 2, 4, 3), (64, 4, 4, 3), (128, 2, 8, 4), (128, 4, 8, 3), (128, 2, 4, 3),
                        (128, 1, 4, 2), (64, 2, 8, 2))


def _autotune_timings(kernel: Any) -> dict[str, Any]:
    """The autotuner's last search, config → ms (Triton keeps it as ``configs_timings``)."""
    timings = getattr(kernel, "configs_timings", None) or {}
    return {str(cfg): (round(t[0], 4) if isinstance(t, (list, tuple)) else round(float(t), 4))
            for cfg, t in timings.items()}


def _with_terms(terms: str, run: Any) -> Any:
    """``run()`` with the window kernel reading its rel-pos terms the other way (``window_attention.TERMS``,
    which is in the autotune key, so it is searched afresh)."""
    own, window_kernel.TERMS = window_kernel.TERMS, terms
    try:
        return run()
    finally:
        window_kernel.TERMS = own


def _with_configs(kernel: Any, configs: list[Any], run: Any) -> Any:
    """``run()`` with ``kernel``'s autotune list replaced by ``configs`` and its choice forgotten, so the next
    call searches them (one config: runs it, no search); the kernel's own list is restored afterwards."""
    own, kernel.configs = kernel.configs, list(configs)
    kernel.cache.clear()
    try:
        return run()
    finally:
        kernel.configs = own
        kernel.cache.clear()


def _extra_configs(kernel: Any) -> list[Any]:
    """The kernel's own tile list and :data:`EXTRA_WINDOW_CONFIGS`."""
    import triton

    return [*kernel.configs, *(triton.Config({"BLOCK_M": bm, "KR": kr}, num_warps=w, num_stages=st)
                               for bm, kr, w, st in EXTRA_WINDOW_CONFIGS)]


FORCED_TILES = 3  # the search's fastest tiles, each timed alone as the bench times the kernel (fused_forced)


def _forced(kernel: Any, configs: list[Any], timings: dict[str, Any], time_one: Any) -> dict[str, Any]:
    """The ``FORCED_TILES`` tiles the last search timed fastest, each timed by ``time_one()`` as the only tile.

    Why: on 2026-11-27 the search timed ViT-B's pick at 0.36 ms and the bench then measured 0.66 with it
    (ViT-H: 0.70 and 0.75). Timing each of the best tiles alone, the bench's way, says whether the pick is
    slow in the bench's conditions or the search's figure was off.
    """
    by_name = {str(c): c for c in configs}
    best = sorted((name for name in timings if name in by_name), key=lambda name: timings[name])[:FORCED_TILES]
    return {name: {"autotune_ms": timings[name], **_with_configs(kernel, [by_name[name]], time_one)}
            for name in best}


def bench_window(name: str, nh: int, D: int, batch: int, grid: int, window: int = 14,
                 device: str = "cuda", extra_configs: bool = False) -> dict[str, Any]:
    dt = torch.bfloat16 if device == "cuda" else torch.float16
    C = nh * D
    torch.manual_seed(0)
    block = vit.Block(ViTConfig(embed_dim=C, num_heads=nh), window=window)
    with torch.no_grad():
        for prm in block.parameters():
            prm.normal_(0, 0.05)
    block = block.to(device).eval()
    exact = FastWindowBlock.from_block(block, FastViTAttention.from_attention(block.attn, "fold"))
    g = torch.Generator(device=device).manual_seed(0)
    qkv32 = torch.randn(batch, grid, grid, 3 * C, device=device, generator=g)
    qkv32_nobias = qkv32 - block.attn.qkv.bias.detach()
    half_src = copy.deepcopy(block).to(dt)
    half = FastWindowBlock.from_block(half_src, FastViTAttention.from_attention(half_src.attn, "fold"), fused=True)
    qkv, qkv_nobias = qkv32.to(dt), qkv32_nobias.to(dt)
    nw = (-(-grid // window)) ** 2
    wins, _ = vit.window_partition(qkv, window)
    wq, wk, wv = wins.reshape(-1, window * window, 3, nh, D).permute(2, 0, 3, 1, 4).unbind(0)
    flops = 4 * batch * nw * nh * (window * window) ** 2 * D
    res: dict[str, Any] = {"model": name, "block": "windowed", "batch": batch, "heads": nh, "head_dim": D,
                           "window": window, "grid": grid}
    fns = {
        "fold": lambda: half.folded_windows(qkv_nobias),
        "fused": lambda: half.fused_windows(qkv),  # what the encoder runs (the flash kernel by default)
        "sdpa_no_bias_windows": lambda: F.scaled_dot_product_attention(wq, wk, wv),
    }
    kernel = getattr(window_kernel, "_window_attention_kernel", None)
    with torch.no_grad():
        res.update(time_variants(fns, flops, device))
        if "ms" in res["fused"] and "ms" in res["fold"]:
            res["speedup_vs_fold"] = round(res["fold"]["ms"] / res["fused"]["ms"], 2)
            n = min(batch, 2)
            ref = exact.folded_windows(qkv32_nobias[:n])
            got = half.fused_windows(qkv[:n]).float()
            res["max_abs_err_fused"] = round(float((got - ref).abs().max()), 5)
            res["max_abs_err_fold"] = round(float((half.folded_windows(qkv_nobias[:n]).float() - ref).abs().max()), 5)
            if device == "cuda" and kernel is not None:
                res["fused_autotune"] = _autotune_timings(kernel)
                res["terms"] = window_kernel.TERMS
                other = "gather" if window_kernel.TERMS == "select" else "select"

                def searched() -> dict[str, Any]:
                    """The kernel timed after a fresh tile search, with its error and the search's timings."""
                    out = time_variants({"fused": lambda: half.fused_windows(qkv)}, flops, device)["fused"]
                    if "error" in out:  # a variant never run on a GPU before: its failure is a result, not a crash
                        return out
                    got = half.fused_windows(qkv[:n]).float()
                    return {**out, "max_abs_err": round(float((got - ref).abs().max()), 5),
                            "autotune": _autotune_timings(kernel)}

                res[f"fused_{other}"] = _with_terms(other, searched)
                if extra_configs:
                    tiles = _extra_configs(kernel)
                    res["fused_extended"] = ext = _with_configs(kernel, tiles, searched)
                    res["fused_forced"] = _forced(kernel, tiles, ext.get("autotune", {}), lambda: time_variants(
                        {"fused": lambda: half.fused_windows(qkv)}, flops, device)["fused"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=64, help="token grid side (64 for 1024 px inputs)")
    p.add_argument("--models", default="vit_b,vit_l,vit_h")
    p.add_argument("--blocks", choices=["both", "global", "windowed"], default="both")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (timings meaningless)")
    p.add_argument("--extra-window-configs", action="store_true",
                   help="also let the window kernel's autotuner choose among EXTRA_WINDOW_CONFIGS (CUDA)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.extra_window_configs and args.device != "cuda":
        p.error("--extra-window-configs times tiles on a GPU: use --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the kernel's CPU check is tests/kernels/, under Triton's interpreter)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("--device cpu runs the kernel under Triton's interpreter: set TRITON_INTERPRET=1")
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    out = {"gpu": gpu, "torch": torch.__version__, "results": []}
    for name, nh, D in SHAPES:
        if name not in wanted:
            continue
        for bench in ((bench_shape, bench_window) if args.blocks == "both" else
                      (bench_shape,) if args.blocks == "global" else (bench_window,)):
            r = (bench_window(name, nh, D, args.batch, args.grid, device=args.device,
                              extra_configs=args.extra_window_configs) if bench is bench_window
                 else bench(name, nh, D, args.batch, args.grid, device=args.device))
            out["results"].append(r)
            print(json.dumps(r), flush=True)
            if args.json:  # after each shape, so a run cut short keeps what it measured
                atomic_write_bytes(Path(args.json), json.dumps(out, indent=1).encode())
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
