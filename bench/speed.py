"""Speed of segany vs the reference segment_anything (and segment-anything-fast's method), one process, same weights.

Measures, per model:

* encoder images/s at ``--batch`` (GPU default 8; CPU default 1, one image);
* prompt → mask latency: one foreground point, embedding already set, through ``predict`` including
  post-processing to the original size and the thresholded numpy mask;
* accuracy of reduced precision vs fp32 on the same inputs: max |logit| error of embeddings and of
  mask logits, and mask IoU (mean and min over prompts).

Variants that fail (out of memory, a compile error, a missing package) are recorded with their error
and the run goes on. segment-anything-fast (pytorch-labs) is not on PyPI — the PyPI name
``segment-anything-fast==0.1.2`` is an unrelated FastSAM/YOLO package — so its published method is
reproduced here: bf16 weights and activations, SDPA with the relative-position bias as an additive mask
(unpadded), ``torch.compile(mode="max-autotune")``. Its custom Triton rel-pos kernel, int8 dynamic
quantization and 2:4 sparsity are not reproduced.

Usage::

    python bench/speed.py --device cpu --models vit_b,vit_t --json bench/speed_cpu.json
    python bench/speed.py --device cuda --models vit_b,vit_l,vit_h --json bench/speed_cuda.json

``--img-size 256 --skip-reference`` builds the models at a smaller input to check every row quickly (the
tests do); its figures are not the models' own.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segany.checkpoints import build_sam  # noqa: E402
from segany.cli._util import atomic_write_bytes  # noqa: E402
from segany.fast import ATTENTIONS, FastPath, configure_cpu_threads, enable_fast_path  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402


# ----------------------------------------------------------------------------------------- helpers
def sig(x: float, digits: int = 5) -> float:
    """``x`` to ``digits`` significant digits: fixed decimals lose ~1% at CPU rates (0.05 img/s), and the
    speed-up ratios are computed from these values."""
    return float(f"{x:.{digits}g}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CPU_TIMES: list[float] = []  # process CPU seconds of the calls of the last `timed` (all threads)


def timed(fn: Callable[[], Any], device: str, warmup: int, iters: int, budget_s: float = 120.0) -> list[float]:
    """Wall seconds per call after ``warmup`` calls; stops early once ``budget_s`` is spent (≥ 1 timed call).

    Process CPU seconds per call go to ``CPU_TIMES``: on a shared machine wall time measures the
    neighbours too, while single-thread CPU time measures only the work done.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    CPU_TIMES.clear()
    start = time.perf_counter()
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        CPU_TIMES.append(time.process_time() - c0)
        if time.perf_counter() - start > budget_s:
            break
    return times


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# Called after every variant: the JSON on disk then holds everything measured so far, so a step killed by
# its time limit on the device machine still returns what it finished.
SAVE_PARTIAL: Callable[[], None] = lambda: None  # noqa: E731


def run_variant(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], device: str) -> None:
    """Run one measurement; record its numbers or its error, never abort the others."""
    try:
        results[name] = fn()
        print(f"  {name}: {results[name]}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a failing variant is data, not a crash
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        print(f"  {name}: FAILED {results[name]['error']}", flush=True)
        if os.environ.get("SEGANY_BENCH_DEBUG"):
            traceback.print_exc()
    finally:
        free(device)
        SAVE_PARTIAL()


def reference_model(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The reference package's model of the same variant carrying segany's weights (strict load)."""
    if name == "vit_t":
        from mobile_sam import sam_model_registry as registry  # type: ignore[import-not-found]
    else:
        from segment_anything import sam_model_registry as registry  # type: ignore[import-not-found]
    ref = registry[name]()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


def reference_predictor(ref: torch.nn.Module) -> Any:
    if type(ref).__module__.startswith("mobile_sam"):
        from mobile_sam import SamPredictor as RefPredictor  # type: ignore[import-not-found]
    else:
        from segment_anything import SamPredictor as RefPredictor  # type: ignore[import-not-found]
    return RefPredictor(ref)


def sam_fast_method_encoder(model: torch.nn.Module, device: str, mode: str = "max-autotune"
                            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """segment-anything-fast's published recipe on our weights: bf16 + SDPA(bias mask) + compile max-autotune.

    segany's reference modules already use SDPA with the unpadded bias as an additive mask, which is
    that project's attention rewrite; the Triton rel-pos kernel is not reproduced.
    """
    enc = copy.deepcopy(model.image_encoder).to(torch.bfloat16).eval()
    return torch.compile(enc, mode=mode if device == "cuda" else None)


def set_embedding(predictor: Any, features: torch.Tensor, input_size: tuple[int, int],
                  original_size: tuple[int, int]) -> None:
    """Give a predictor (ours or the reference) an embedding without running its encoder again."""
    predictor.reset_image()
    predictor.features = features
    predictor.input_size = input_size
    predictor.original_size = original_size
    predictor.is_image_set = True


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def sized_model(name: str, img_size: int) -> torch.nn.Module:
    """A registered architecture at another input size (random weights), for quick runs of every row: the
    windowed blocks, padding and post-processing are the same code at 256 px as at 1024, at 1/20 the cost."""
    from dataclasses import replace

    from segany.modeling.sam import Sam
    from segany.registry import get_config

    cfg = get_config(name)
    return Sam(replace(cfg, encoder=replace(cfg.encoder, img_size=img_size)))


# ----------------------------------------------------------------------------------------- benches
def with_gelu_epilogue(variants: list[tuple[str, dict[str, Any]]], choice: str) -> list[tuple[str, dict[str, Any]]]:
    """``--gelu-epilogue``: leave each reduced-precision, unquantized variant at FastPath's default, force the
    MLP's GELU epilogue off or on, or time both (the ``_gelu_epilogue`` twin right after its plain one)."""
    if choice == "default":
        return variants
    out: list[tuple[str, dict[str, Any]]] = []
    for label, kw in variants:
        if kw.get("precision") == "fp32" or kw.get("quantize"):  # the option needs bf16 GEMMs of its own
            out.append((label, kw))
            continue
        if choice in ("off", "both"):
            out.append((label, {**kw, "gelu_epilogue": False}))
        if choice in ("on", "both"):
            out.append((f"{label}_gelu_epilogue", {**kw, "gelu_epilogue": True}))
    return out


def bench_model(name: str, args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """Fill ``out`` (already in the report, so partial saves include it) with every variant's figures."""
    device = args.device
    torch.manual_seed(0)
    model = (build_sam(name) if args.img_size is None else sized_model(name, args.img_size)).to(device).eval()
    s = model.img_size
    batch = args.batch
    x = (torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))).to(device)
    out.update({"model": name, "img_size": s, "batch": batch})
    enc: dict[str, Any] = {}
    out["encoder_img_per_s"] = enc
    print(f"[{name}] encoder, batch {batch}", flush=True)
    parts = set(args.parts.split(","))

    def enc_variant(fn: Callable[[torch.Tensor], torch.Tensor], cast: torch.dtype) -> Callable[[], dict[str, Any]]:
        def measure() -> dict[str, Any]:
            xin = x.to(cast)
            with torch.inference_mode():
                times = timed(lambda: fn(xin), device, args.warmup, args.iters, args.budget)
            t = statistics.median(times)
            return {"img_per_s": sig(batch / t), "s_per_batch": sig(t),
                    "cpu_s_per_batch": sig(statistics.median(CPU_TIMES)), "n": len(times)}
        return measure

    ref = None
    if not args.skip_reference:
        try:
            ref = reference_model(model, name).to(device)
        except Exception as exc:  # noqa: BLE001
            enc["reference"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if ref is not None and "encoder" in parts:
        run_variant(enc, "reference_fp32", enc_variant(ref.image_encoder, torch.float32), device)
        if device == "cuda" or "bf16" in args.cpu_variants:
            def ref_bf16() -> dict[str, Any]:
                e = copy.deepcopy(ref.image_encoder).to(torch.bfloat16)
                return enc_variant(e, torch.bfloat16)()
            run_variant(enc, "reference_bf16", ref_bf16, device)
    variants: list[tuple[str, dict[str, Any]]] = [] if args.skip_eager else [("segany_fp32", {"precision": "fp32"})]
    if (device == "cuda" or "bf16" in args.cpu_variants) and not args.skip_eager:
        variants.append(("segany_bf16", {"precision": "bf16", "attention": "mask"}))
    if device == "cuda":
        for att in args.attentions:  # "mask" is segany_bf16 itself
            variants.append((f"segany_bf16_{att}", {"precision": "bf16", "attention": att}))
    if args.compile:
        mode = args.compile_mode if device == "cuda" else True
        if not args.no_compile_mask:
            variants.append(("segany_bf16_compiled", {"precision": "bf16", "attention": "mask", "compile": mode}))
        for att in args.compile_attentions:
            variants.append((f"segany_bf16_{att}_compiled", {"precision": "bf16", "attention": att, "compile": mode}))
    for fmt in args.encoder_quant if device == "cuda" else []:  # 8-bit block GEMMs (opt-in, cost accuracy)
        for att in args.compile_attentions or ["mixed"]:
            kw = {"precision": "bf16", "attention": att, "quantize": fmt}
            variants.append((f"segany_{fmt}_{att}_compiled", {**kw, "compile": mode}) if args.compile
                            else (f"segany_{fmt}_{att}", kw))
    variants = with_gelu_epilogue(variants, args.gelu_epilogue)
    for label, kw in variants if "encoder" in parts else []:
        def seg(kw: dict[str, Any] = kw) -> dict[str, Any]:
            fp = FastPath(model, **kw)
            return enc_variant(fp._encode_fn, fp.dtype)()
        run_variant(enc, label, seg, device)
    if ("encoder" in parts and args.compile and not args.skip_sam_fast
            and (device == "cuda" or "bf16" in args.cpu_variants)):
        run_variant(enc, "sam_fast_method", lambda: enc_variant(
            sam_fast_method_encoder(model, device, args.compile_mode), torch.bfloat16)(), device)
    if "encoder" in parts and device == "cpu" and "onnx" in args.cpu_variants:
        run_variant(enc, "onnx_fp32", lambda: onnx_encoder(model, x[:1], args, quantized=False), device)
        if args.quantize:
            run_variant(enc, "onnx_int8", lambda: onnx_encoder(model, x[:1], args, quantized=True), device)
    base = enc.get("reference_fp32", {}).get("img_per_s")
    if base:
        out["encoder_speedup_vs_reference_fp32"] = {k: round(v["img_per_s"] / base, 2) for k, v in enc.items()
                                                   if isinstance(v, dict) and "img_per_s" in v}
        cpu_base = enc["reference_fp32"]["cpu_s_per_batch"]
        if device == "cpu" and cpu_base:
            out["encoder_cpu_time_speedup_vs_reference_fp32"] = {
                k: round(cpu_base / v["cpu_s_per_batch"], 2) for k, v in enc.items()
                if isinstance(v, dict) and v.get("cpu_s_per_batch")}

    # -------------------------------------------------------------- prompt latency and accuracy
    if not parts & {"prompt", "accuracy"}:
        return out
    rng = np.random.RandomState(0)
    orig = (768, 1024)
    image = (rng.rand(*orig, 3) * 255).astype(np.uint8)
    exact = SamPredictor(model, precision="fp32")
    exact.fast = None  # the exact modules, also on CUDA
    exact.set_image(image)
    if "prompt" in parts:
        prompt_latency(out, model, ref, exact, orig, args)
    accuracy_rows(out, model, exact, image, args)
    return out


def prompt_latency(out: dict[str, Any], model: torch.nn.Module, ref: torch.nn.Module | None, exact: SamPredictor,
                   orig: tuple[int, int], args: argparse.Namespace) -> None:
    """ms per one-point prompt with the embedding set, post-processing included, for every variant."""
    device, name = args.device, out["model"]
    print(f"[{name}] prompt -> mask", flush=True)
    feats, input_size = exact.features, exact.input_size
    point = (np.array([[600, 400]]), np.array([1]))
    lat: dict[str, Any] = {}
    out["prompt_ms"] = lat

    def prompt_variant(pred: Any, features: torch.Tensor | None = feats) -> Callable[[], dict[str, Any]]:
        def measure() -> dict[str, Any]:
            if features is not None:
                set_embedding(pred, features, input_size, orig)
            times = timed(lambda: pred.predict(point_coords=point[0], point_labels=point[1]), device,
                          args.warmup + 2, args.prompt_iters, args.budget)
            return {"ms": round(1000 * statistics.median(times), 3), "min_ms": round(1000 * min(times), 3),
                    "cpu_ms": round(1000 * statistics.median(CPU_TIMES), 3), "n": len(times)}
        return measure

    if ref is not None:
        run_variant(lat, "reference", prompt_variant(reference_predictor(ref)), device)
    run_variant(lat, "segany_fp32", prompt_variant(exact), device)
    if device == "cuda":
        run_variant(lat, "segany_fp32_graphs", prompt_variant(SamPredictor(model, precision="fp32")), device)
        run_variant(lat, "segany_bf16_graphs", prompt_variant(SamPredictor(model, precision="bf16")), device)
    else:
        def fp32_fast_decoder() -> dict[str, Any]:
            pred = SamPredictor(model)
            enable_fast_path(pred, precision="fp32", fast_decoder=True)
            return prompt_variant(pred)()
        run_variant(lat, "segany_fp32_fast_decoder", fp32_fast_decoder, device)
        if "bf16" in args.cpu_variants:
            run_variant(lat, "segany_bf16", prompt_variant(SamPredictor(model, precision="bf16")), device)
    if args.compile:
        run_variant(lat, "segany_bf16_compiled",
                    prompt_variant(SamPredictor(model, precision="bf16", compile=True)), device)
    if device == "cpu" and "onnx" in args.cpu_variants:
        run_variant(lat, "onnx_fp32", lambda: onnx_prompt(model, feats, input_size, orig, point, args, False), device)
        if args.quantize:
            run_variant(lat, "onnx_int8", lambda: onnx_prompt(model, feats, input_size, orig, point, args, True),
                        device)
    base = lat.get("reference", {}).get("ms")
    if base:
        out["prompt_speedup_vs_reference"] = {k: round(base / v["ms"], 2) for k, v in lat.items()
                                              if isinstance(v, dict) and "ms" in v}
        cpu_base = lat["reference"]["cpu_ms"]
        if device == "cpu" and cpu_base:
            out["prompt_cpu_time_speedup_vs_reference"] = {k: round(cpu_base / v["cpu_ms"], 2) for k, v in lat.items()
                                                           if isinstance(v, dict) and v.get("cpu_ms")}


def accuracy_rows(out: dict[str, Any], model: torch.nn.Module, exact: SamPredictor, image: np.ndarray,
                  args: argparse.Namespace) -> None:
    """Reduced precision against the exact fp32 modules on the same image and prompts."""
    device, name = args.device, out["model"]
    if device == "cuda" or "bf16" in args.cpu_variants or args.encoder_quant:
        print(f"[{name}] bf16 vs fp32 accuracy", flush=True)
        out["bf16_accuracy"] = {}
        if device == "cuda" or "bf16" in args.cpu_variants:
            run_variant(out["bf16_accuracy"], "segany_bf16",
                        lambda: accuracy(model, exact, image, "bf16", device), device)
        for att in args.attentions if device == "cuda" else []:  # each eager attention mode's own error
            run_variant(out["bf16_accuracy"], f"segany_bf16_{att}",
                        lambda att=att: accuracy(model, exact, image, "bf16", device, attention=att), device)
        for fmt in args.encoder_quant:  # runs on CPU too (slowly): the accuracy needs no GPU
            run_variant(out["bf16_accuracy"], f"segany_{fmt}",
                        lambda fmt=fmt: accuracy(model, exact, image, "bf16", device, quantize=fmt), device)
        if device == "cuda" and args.gelu_epilogue in ("on", "both"):  # the CPU computes the exact GELU anyway
            run_variant(out["bf16_accuracy"], "segany_bf16_gelu_epilogue",
                        lambda: accuracy(model, exact, image, "bf16", device, gelu_epilogue=True), device)


def accuracy(model: torch.nn.Module, exact: SamPredictor, image: np.ndarray, precision: str,
             device: str, quantize: str | None = None, attention: str = "auto",
             gelu_epilogue: bool | None = None) -> dict[str, Any]:
    quick = SamPredictor(model, fast_path=FastPath(model, precision=precision, quantize=quantize,
                                                   attention=attention, gelu_epilogue=gelu_epilogue))
    quick.set_image(image)
    emb_err = (quick.features - exact.features).abs().max().item()
    emb_scale = exact.features.abs().max().item()
    h, w = image.shape[:2]
    rng = np.random.RandomState(1)
    ious, logit_errs, logit_scale = [], [], []
    for _ in range(8):
        pts = np.stack([rng.randint(0, w, 3), rng.randint(0, h, 3)], axis=1)
        labels = np.array([1, 1, 0])
        for multimask in (True, False):
            a = exact.predict(pts, labels, multimask_output=multimask, return_logits=True)
            b = quick.predict(pts, labels, multimask_output=multimask, return_logits=True)
            logit_errs.append(float(np.abs(a[0] - b[0]).max()))
            logit_scale.append(float(np.abs(a[0]).max()))
            ious.extend(mask_iou(x > 0, y > 0) for x, y in zip(a[0], b[0], strict=True))
    return {"embedding_max_abs_err": round(emb_err, 5), "embedding_max_abs": round(emb_scale, 4),
            "mask_logit_max_abs_err": round(max(logit_errs), 5), "mask_logit_max_abs": round(max(logit_scale), 4),
            "mask_iou_mean": round(float(np.mean(ious)), 5), "mask_iou_min": round(float(np.min(ious)), 5),
            "n_masks": len(ious), "attention": quick.fast.attention if quick.fast is not None else None}


_ONNX_DIRS: dict[tuple[int, bool], Path] = {}


def _onnx_dir(model: torch.nn.Module, quantized: bool) -> Path:
    from segany.export.onnx import export_onnx

    key = (id(model), quantized)
    if key not in _ONNX_DIRS:
        folder = Path(tempfile.mkdtemp(prefix="segany_bench_onnx_"))
        # Each export is a few hundred MB for ViT-B; left behind, repeated runs fill the disk.
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        export_onnx(copy.deepcopy(model).cpu(), folder, quantize_int8=quantized)
        _ONNX_DIRS[key] = folder
    return _ONNX_DIRS[key]


def onnx_encoder(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, quantized: bool) -> dict[str, Any]:
    from segany.export.onnx import OnnxPredictor

    pred = OnnxPredictor(_onnx_dir(model, quantized), quantized=quantized, num_threads=args.threads)
    img = (np.random.RandomState(2).rand(model.img_size, model.img_size, 3) * 255).astype(np.uint8)
    times = timed(lambda: pred.set_image(img), "cpu", args.warmup, args.iters, args.budget)
    t = statistics.median(times)
    return {"img_per_s": sig(1 / t), "s_per_batch": sig(t),
            "cpu_s_per_batch": sig(statistics.median(CPU_TIMES)), "n": len(times), "batch": 1}


def onnx_prompt(model: torch.nn.Module, feats: torch.Tensor, input_size: tuple[int, int], orig: tuple[int, int],
                point: tuple[np.ndarray, np.ndarray], args: argparse.Namespace, quantized: bool) -> dict[str, Any]:
    from segany.export.onnx import OnnxPredictor

    pred = OnnxPredictor(_onnx_dir(model, quantized), quantized=quantized, num_threads=args.threads)
    set_embedding(pred, feats.cpu().numpy(), input_size, orig)
    times = timed(lambda: pred.predict(point_coords=point[0], point_labels=point[1]), "cpu",
                  args.warmup + 2, args.prompt_iters, args.budget)
    return {"ms": round(1000 * statistics.median(times), 3), "min_ms": round(1000 * min(times), 3),
            "cpu_ms": round(1000 * statistics.median(CPU_TIMES), 3), "n": len(times)}


# ----------------------------------------------------------------------------------------- main
def machine(device: str, compiled: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["logical_cpus"] = os.cpu_count()
    # Inductor's environment switches (TORCHINDUCTOR_FREEZING=1, …) change the compiled rows: keep them with them.
    info["inductor_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_")}
    info["segany_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SEGANY_")}  # experiments
    if compiled:
        # A compiled row timed from a warm cache may be a graph compiled under other settings (2026-11-27
        # late): say which folder the compiles use and how full it was before this run.
        from segany.fast import compile_cache_dir

        cache = compile_cache_dir()
        info["compile_cache"] = {"dir": str(cache), "files_before": sum(1 for p in cache.rglob("*") if p.is_file())}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="vit_b", help="comma-separated: vit_b,vit_l,vit_h,vit_t")
    p.add_argument("--batch", type=int, help="encoder batch (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--iters", type=int, help="timed encoder calls (default 10 CUDA, 2 CPU)")
    p.add_argument("--prompt-iters", type=int, default=50)
    p.add_argument("--warmup", type=int, help="untimed calls first (default 3 CUDA, 1 CPU)")
    p.add_argument("--budget", type=float, default=120.0, help="max seconds of timed calls per variant")
    p.add_argument("--compile", action="store_true", help="include torch.compile variants (slow to start)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode of compiled encoders on CUDA (max-autotune is what segment-anything-fast "
                        "published; 'default' compiles much faster)")
    p.add_argument("--attentions", default="fold,mixed,fused",
                   help="CUDA: bf16 encoder variants with these attention modes besides 'mask' (comma-separated; "
                        "flex compiles its kernel on first use; it measured 3x slower than mask on an H200)")
    p.add_argument("--compile-attentions", default="",
                   help="also compile the encoder with these attention modes (e.g. fold,mixed,fused)")
    p.add_argument("--no-compile-mask", action="store_true",
                   help="skip the compiled 'mask' encoder (already measured; saves a compile, minutes in max-autotune)")
    p.add_argument("--cpu-variants", default="bf16,onnx", help="CPU extras: bf16, onnx (comma-separated, or none)")
    p.add_argument("--quantize", action="store_true", help="CPU: also time int8 ONNX graphs")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--gelu-epilogue", choices=["default", "off", "on", "both"], default="default",
                   help="the ViT MLP's GELU in the first GEMM's cuBLASLt epilogue (FastPath(gelu_epilogue=)): "
                        "leave each bf16 variant at its default, force it off or on, or time both; on CUDA "
                        "'on'/'both' also add its accuracy row")
    p.add_argument("--skip-sam-fast", action="store_true",
                   help="with --compile: leave out segment-anything-fast's method (a minute of compiling)")
    p.add_argument("--skip-eager", action="store_true",
                   help="leave out the eager segany fp32/bf16 encoder rows (compile-only steps: ViT-H fp32 costs ~20 s)")
    p.add_argument("--parts", default="encoder,prompt",
                   help="encoder, prompt, accuracy (comma-separated; prompt includes the accuracy check)")
    p.add_argument("--encoder-quant", default="",
                   help="8-bit block GEMMs to add (comma-separated: int8, fp8; quantize= of FastPath): "
                        "timed on CUDA, accuracy against fp32 on any device")
    p.add_argument("--img-size", type=int,
                   help="build the models at this input size instead of their own (a multiple of 64; with "
                        "--skip-reference, since the reference builds 1024 px only): quick checks, not figures")
    p.add_argument("--json", help="write all results here")
    p.set_defaults(compile=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    gpu = args.device == "cuda"
    args.batch = args.batch or (8 if gpu else 1)
    args.iters = args.iters or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.compile = gpu if args.compile is None else args.compile
    args.cpu_variants = {v for v in args.cpu_variants.split(",") if v and v != "none"}
    args.attentions = [a for a in args.attentions.split(",") if a and a != "mask"]
    args.compile_attentions = [a for a in args.compile_attentions.split(",") if a and a != "mask"]
    for a in args.attentions + args.compile_attentions:
        if a not in ATTENTIONS:
            p.error(f"unknown attention mode {a!r}; known: {', '.join(ATTENTIONS)}")
    args.encoder_quant = [f for f in args.encoder_quant.split(",") if f]
    for f in args.encoder_quant:
        if f not in ("int8", "fp8"):
            p.error(f"unknown --encoder-quant format {f!r}; known: int8, fp8")
    if args.img_size is not None and (args.img_size < 64 or args.img_size % 64):
        p.error(f"--img-size must be a positive multiple of 64, got {args.img_size}")
    if args.img_size is not None and not args.skip_reference:
        p.error("--img-size needs --skip-reference: the reference package builds its models at 1024 px only")
    unknown_parts = set(args.parts.split(",")) - {"encoder", "prompt", "accuracy"}
    if unknown_parts:
        p.error(f"unknown --parts {', '.join(sorted(unknown_parts))}; known: encoder, prompt, accuracy")
    if not gpu:
        args.threads = configure_cpu_threads(args.threads)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in this table
        torch.backends.cudnn.allow_tf32 = False
    report: dict[str, Any] = {"machine": machine(args.device, args.compile), "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                                         for k, v in vars(args).items()},
                              "results": []}
    global SAVE_PARTIAL
    if args.json:
        def save() -> None:
            atomic_write_bytes(Path(args.json), json.dumps(report, indent=1).encode())
        SAVE_PARTIAL = save
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        out: dict[str, Any] = {"model": name}
        report["results"].append(out)
        try:
            bench_model(name, args, out)
        except Exception as exc:  # noqa: BLE001 - one model failing (OOM) must not lose the others
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"[{name}] FAILED: {exc}", flush=True)
        free(args.device)
        SAVE_PARTIAL()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    code = main()
    for folder in _ONNX_DIRS.values():  # os._exit below skips atexit, where these would be removed
        shutil.rmtree(folder, ignore_errors=True)
    # Leave at once: the JSON is written. After a max-autotune compile the interpreter's exit waited on
    # Inductor's compile workers until the device call's step limit killed it (rc 124 on 2026-11-26,
    # with complete results), minutes of a scarce GPU call spent doing nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
