"""Linear layers with 8-bit GEMMs (int8 or fp8 e4m3): per-output-channel weight scales, per-token
activation scales, computed on the fly.

Why: ViT-H spends most of its compiled encoder time in the blocks' four GEMMs (qkv, proj, lin1, lin2;
5.2 TFLOP per 1024 px image), and Ampere-and-later GPUs run int8 GEMMs (Ada and Hopper also fp8) at
twice the bf16 rate. The bf16 encoder stopped at 62 img/s on an H200 against a target of 80
(docs/benchmarks.md, issue 7). Quantising the block GEMMs with dynamic per-token scales is what
segment-anything-fast did for its int8 figures.

Scaling: each weight row (output channel) gets its own scale, fixed at conversion; each activation
row (token) gets one per call from its absolute maximum. So an outlier token or channel costs precision
only in its own row. The two formats differ in where they lose it:

* ``int8``: a uniform grid of 255 steps across the row. On random-weight ViT-B the embedding moved by
  2.1% (relative L2) against 1.1% for bf16 alone. ``torch._int_mm`` gives int32 sums, and the scales and
  bias are applied after. So the GEMM writes 4 bytes per output instead of 2, unless Inductor generates
  the GEMM itself and fuses the scaling into it. It does that with ``mode="max-autotune"``'s Triton
  templates; Inductor also has a default-mode pattern behind ``force_fuse_int_mm_with_mul`` (still in torch
  2.14, for a 2-D CUDA scale), which :class:`segany.fast.FastPath` turns on around its compiled int8 encoder
  only. Otherwise the scaling at least fuses with the op that reads the output (GELU, the residual add).
* ``fp8`` (e4m3): 3 mantissa bits, so every value is off by up to 1/16 of itself: 7.5% on the same
  test. ``torch._scaled_mm`` applies both scales and the bias inside the GEMM and writes bf16, so it
  needs no compile to avoid an extra pass; it needs compute capability 8.9+.

These are opt-in trades of accuracy for speed; ``bench/speed.py --encoder-quant int8,fp8`` reports both. The CPU
has both ops too (slow for fp8), so the tests run the same calls a GPU makes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FORMATS", "QuantLinear", "convert_linears", "quantize_rows", "supported"]

FORMATS = ("int8", "fp8")
FP8 = torch.float8_e4m3fn
_QMAX = {"int8": 127.0, "fp8": float(torch.finfo(FP8).max)}  # fp8: 448
_QDTYPE = {"int8": torch.int8, "fp8": FP8}
_ALIGN = 16  # the GPU kernels need the contracted and output sizes divisible by 8 (int8) or 16 (fp8)
_MIN_CC = {"int8": (8, 0), "fp8": (8, 9)}


def supported(fmt: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether ``fmt`` GEMMs run on ``device``, and if not, why (for the caller's error message)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available here"
        major, minor = torch.cuda.get_device_capability(dev)
        need = _MIN_CC[fmt]
        if (major, minor) < need:
            name = torch.cuda.get_device_name(dev)
            return False, (f"{fmt} GEMMs need compute capability {need[0]}.{need[1]}+; "
                           f"{name} is {major}.{minor}")
        return True, ""
    if dev.type == "cpu":
        return True, ""
    return False, f"{fmt} GEMMs are not available on {dev.type}"


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) → 8-bit values and fp32 (M, 1) scales with ``x ≈ values · scales`` (row maximum → format max)."""
    qmax = _QMAX[fmt]
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax  # an all-zero row stays finite
    y = xf / scale
    if fmt == "int8":
        y = y.round()
    return y.clamp(-qmax, qmax).to(_QDTYPE[fmt]), scale


class QuantLinear(nn.Module):
    """Inference-only replacement for an ``nn.Linear`` whose GEMM runs in ``fmt``; output in ``out_dtype``.

    Keeps ``bias`` (and ``in_features``/``out_features``) under the usual names so code that adds the
    bias itself, like segany's window block, can call :meth:`matmul` and read ``bias``.
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, src: nn.Linear, fmt: str, out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.fmt, self.out_dtype = fmt, out_dtype
        self.in_features, self.out_features = src.in_features, src.out_features
        with torch.no_grad():
            wq, ws = quantize_rows(src.weight.detach(), fmt)
        self.register_buffer("weight_q", wq)  # (N, K) row-major: its .t() is the column-major mat2
        self.register_buffer("weight_scale", ws.reshape(1, -1).contiguous())  # (1, N)
        bias = None if src.bias is None else src.bias.detach().to(out_dtype)
        self.register_buffer("bias", bias)

    @staticmethod
    def eligible(layer: nn.Module) -> bool:
        """Plain linear layers whose sizes the 8-bit kernels accept."""
        return (type(layer) is nn.Linear and layer.in_features % _ALIGN == 0
                and layer.out_features % _ALIGN == 0)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ Wᵀ (+ bias)`` over the last dimension of ``x``: 8-bit products, exact int32 or fp32 sums."""
        lead = x.shape[:-1]
        # Row-major rows for the GPU kernels (a window block's tokens can arrive as a strided view).
        xq, xs = quantize_rows(x.reshape(-1, self.in_features).contiguous(), self.fmt)
        if self.fmt == "fp8":
            out = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale,
                                   bias=bias, out_dtype=self.out_dtype)
        else:
            y = torch._int_mm(xq, self.weight_q.t()) * xs  # int_mm·scale: the pattern fusions look for
            y = y * self.weight_scale
            out = (y if bias is None else y + bias).to(self.out_dtype)
        return out.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"out_dtype={self.out_dtype}")


def convert_linears(root: nn.Module, fmt: str, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every eligible ``nn.Linear`` under ``root`` with :class:`QuantLinear`; returns how many.

    Call it after any ``.to(dtype)`` of the module: fp8 tensors count as floating point, so a later
    cast would turn fp8 weights back into (rounded) bf16 and the fp32 scales into bf16.
    """
    count = 0
    for name, child in list(root.named_children()):
        if QuantLinear.eligible(child):
            setattr(root, name, QuantLinear(child, fmt, out_dtype))  # type: ignore[arg-type]
            count += 1
        else:
            count += convert_linears(child, fmt, out_dtype)
    return count
