"""Fast inference paths: reduced precision, fused attention, batched encoding, compile and CUDA graphs.

The fp32 modules in :mod:`segany.modeling` are the numerical reference and stay untouched. A
:class:`FastPath` keeps *copies* of the image encoder and mask decoder cast to bf16/fp16, with the
ViT's attention swapped for :class:`FastViTAttention`, which gives the decomposed relative-position
bias to ``scaled_dot_product_attention`` in a layout its fused kernels accept:

* ``attention="auto"`` (default): ``fused`` on a CUDA GPU of compute capability 8.0+ with Triton, eager
  or compiled (on an H200 the fastest mode either way: ViT-B 209 img/s eagerly against 183 for ``fold``,
  360 compiled against 287 for ``mixed``), and otherwise ``mixed`` when compiled and ``mask`` eagerly
  (:func:`resolve_attention`).
* ``attention="mask"``: the bias is written into a buffer whose last dimension is padded to
  a multiple of 8 and passed as an additive mask; the memory-efficient (and cuDNN) kernels need that
  alignment, otherwise SDPA pads (copies) the bias on every call or falls back to the math kernel.
* ``attention="fold"``: the bias is folded into the dot product, ``q' = [q·s, q·R_h, q·R_w]`` and
  ``k' = [k, onehot(row), onehot(col)]``, so no (L, L) bias exists at all and flash kernels can run;
  it costs a wider head (64 → 192 for global blocks), so which one wins depends on the GPU: measure it
  with ``bench/speed.py``.
* ``attention="mixed"``: ``fold`` in the windowed blocks (14 + 14 extra columns on a 64-wide head) and
  ``mask`` in the few global blocks, where folding would triple the head.
* ``attention="fused"``: segany's Triton kernels. In the global blocks :mod:`segany.kernels.relpos_attention`
  adds the bias tile by tile from the two small tables (on an H200 3.8–4.4× faster than SDPA with the
  bias mask, with a quarter of its error against fp32; ``bench/relpos_kernel.py``). In the windowed
  blocks :mod:`segany.kernels.window_attention` goes from the ``qkv`` projection straight to token order
  (see :class:`FastWindowBlock`). On devices without Triton the global blocks fall back to ``mask`` and
  the windowed ones to ``fold``.
* ``attention="flex"``: PyTorch's ``flex_attention`` with the bias added by a ``score_mod`` that reads
  the two small (L, H) and (L, W) tables, so neither an (L, L) bias nor a wider head exists. It is
  compiled to a fused Triton kernel on CUDA; on CPU it runs uncompiled, which is exact but slow (a
  correctness path for tests, not a speed option). On an H200 it was 3× slower than ``mask`` (two scalar
  gathers per score; ``docs/benchmarks.md``): kept for comparison, not recommended.

Prompt → mask latency on CUDA comes from capturing the decoder plus mask post-processing in a CUDA
graph per prompt shape (:class:`_GraphCache`), or from ``torch.compile(mode="reduce-overhead")`` with
``compile=True``. Compiled artefacts are cached on disk under ``$SEGANY_HOME/compile-cache`` (a folder per
kernel setting, :func:`compile_cache_dir`) so the compile cost is paid once per machine.

Entry points: ``SamPredictor(model, precision=..., compile=...)`` (which builds a :class:`FastPath`
when it helps), :func:`encode_images` for batched embeddings, :func:`configure_cpu_threads`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segany import cpu_alloc, cpu_upscale
from segany.errors import InputError
from segany.kernels import gelu_epilogue as gelu_kernel
from segany.kernels import quant_linear
from segany.kernels import relpos_attention as relpos_kernel
from segany.kernels import window_attention as window_kernel
from segany.modeling import image_encoder as vit
from segany.modeling.layers import LayerNorm2d
from segany.modeling.sam import Sam
from segany.transforms import cropped_upsample_extent

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTIONS = ("auto", "mask", "fold", "mixed", "fused", "flex")
QUANTIZE = (None, "int8", "fp8")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ settings
def resolve_attention(attention: str, device: torch.device | str, compile: bool | str = False) -> str:
    """``"auto"`` → the attention mode measured fastest for this device and compile setting; others unchanged.

    The fused kernel needs Triton and bf16 tensor-core dots (compute capability 8.0+). It is the fastest
    mode measured on an H200 both eagerly (ViT-B 209 img/s against 183 for ``fold``) and compiled (ViT-B
    360 / ViT-L 130 / ViT-H 68 img/s against ``mixed``'s 273 / 113 / 62), docs/benchmarks.md, 2026-11-26; with
    the window kernel, 380 / 140 / 74 on 2026-11-27.
    """
    if attention not in ATTENTIONS:
        raise InputError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention != "auto":
        return attention
    device = torch.device(device)
    if device.type != "cuda":
        return "mask"
    if relpos_kernel.available(device) and torch.cuda.get_device_capability(device) >= (8, 0):
        return "fused"
    return "mixed" if compile else "mask"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` → ``"bf16"`` on CUDA, ``"fp32"`` elsewhere (CPU stays exact by default)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        return "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise InputError("precision='fp16' is not supported on CPU (slow and inaccurate there); use 'bf16' or 'fp32'")
    return precision


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX-BF16 or AVX512-BF16, as Linux reports them).

    Why it matters: there oneDNN's bf16 GEMMs make the encoder 1.4–3.8× and a click 1.8–4.1× faster than
    the exact fp32 path (docs/benchmarks.md); elsewhere bf16 is converted in software and is slower than fp32. The
    command line's ``--precision auto`` uses it to pick bf16 on such CPUs. ``SEGANY_CPU_BF16=1`` or ``0``
    overrides the detection (a CPU whose flags this cannot read, or to keep a run exact). ``cpuinfo``: the
    text of ``/proc/cpuinfo`` (read when None).
    """
    forced = os.environ.get("SEGANY_CPU_BF16", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise InputError(f"SEGANY_CPU_BF16={forced!r} is not understood; set it to 1 (use bf16 on this CPU) "
                         "or 0 (keep fp32), or unset it to detect")
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:  # not Linux: no reliable flag to read, keep fp32
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool({"amx_bf16", "avx512_bf16"} & flags)
    return False


def machine_auto(precision: str, device: torch.device | str) -> tuple[str, bool]:
    """What the command line's ``--precision auto`` runs on ``device``: ``(precision, fast_decoder)``.

    On a CPU with native bf16 it is bf16; on other CPUs it stays ``"auto"`` (fp32) with the folded decoder,
    equal to the exact one to rounding and about twice as fast per click there (docs/benchmarks.md). Other
    values and devices pass through with ``fast_decoder`` False. One rule for ``predict``/``auto``/``serve``
    and the ``engine auto`` workers, each deciding on the machine it runs on.
    """
    if precision != "auto" or torch.device(device).type != "cpu":
        return precision, False
    return ("bf16", False) if cpu_has_native_bf16() else ("auto", True)


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads``, or to the physical cores we may use; returns the count.

    The command line's ``--threads N`` (``predict``, ``auto``, ``eval``, ``serve``) calls it with N; without
    the option torch keeps its own choice (``OMP_NUM_THREADS`` where set). With ``None``: hyper-threads slow
    GEMM-bound inference down, and a process limited by ``taskset``/cgroups should not start more threads
    than it owns, so we count the usable CPUs and halve them when SMT is on.

    Raises:
        InputError: ``num_threads`` below 1.
    """
    if num_threads is not None and (isinstance(num_threads, bool) or int(num_threads) != num_threads
                                    or num_threads < 1):
        raise InputError(f"threads must be a whole number of at least 1, got {num_threads!r}; pass e.g. 1 to "
                         "leave the other cores free, or the number of physical cores for the fastest run",
                         cli=f"--threads must be at least 1, got {num_threads!r}; pass e.g. --threads 1 to leave "
                             "the other cores free, or leave it out for torch's own choice")
    if num_threads is None:
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            usable = os.cpu_count() or 1
        smt = 1
        try:
            siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
            smt = max(1, len(siblings.replace("-", ",").split(",")))
        except OSError:
            pass
        num_threads = max(1, usable // smt) if usable >= 2 * smt else usable
    torch.set_num_threads(int(num_threads))
    return int(num_threads)


_OWN_CACHE_DIR: str | None = None  # the cache directory compile_cache_dir chose last (not the user's)


def kernel_settings_key() -> str:
    """A short hash of segany's kernel settings that a compiled graph bakes in without its cache seeing them.

    Why: torch's AOTAutograd cache keys a graph on its Triton kernels' source, not on their autotune config
    lists or their constexpr arguments. A graph compiled before a tile list changed, or under the other
    :data:`segany.kernels.window_attention.TERMS`, was served again from disk (seen on an H200, 2026-11-27:
    ViT-H timed the old tiles after the change). A cache directory per setting keeps them apart.
    """
    parts = [f"window_terms={window_kernel.TERMS}"]
    for kernel in (getattr(window_kernel, "_window_attention_kernel", None),
                   getattr(relpos_kernel, "_relpos_attention_kernel", None)):
        parts.append(";".join(str(c) for c in getattr(kernel, "configs", ())))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def compile_cache_dir() -> Path:
    """Point TorchInductor's on-disk cache at ``$SEGANY_HOME/compile-cache/kernels-<key>`` (unless the user
    set ``TORCHINDUCTOR_CACHE_DIR``), the key from :func:`kernel_settings_key`."""
    global _OWN_CACHE_DIR
    from segany.checkpoints import weights_home

    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if user and user != _OWN_CACHE_DIR:
        path = Path(user)
    else:
        path = weights_home() / "compile-cache" / f"kernels-{kernel_settings_key()}"
        _OWN_CACHE_DIR = str(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        inductor_config.autotune_local_cache = True
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    return path


# ------------------------------------------------------------------------------------------ modules
class FastViTAttention(nn.Module):
    """Drop-in for :class:`segany.modeling.image_encoder.Attention` that feeds fused SDPA kernels.

    Shares the parameters of the module it is built from (call :meth:`from_attention`). The maths is
    the same as the reference; only where the bias lives in memory (``"mask"``) or how it is applied
    (``"fold"``) differs, so fp32 results agree to rounding.
    """

    def __init__(self, src: vit.Attention, mode: str = "mask") -> None:
        super().__init__()
        if mode not in ATTENTIONS or mode == "auto":
            raise InputError(f"attention must be one of {', '.join(ATTENTIONS[1:])}, got {mode!r}")
        self.num_heads = src.num_heads
        self.head_dim = src.head_dim
        self.qkv = src.qkv
        self.proj = src.proj
        self.use_rel_pos = src.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = src.rel_pos_h
            self.rel_pos_w = src.rel_pos_w
        self.mode = mode
        if mode == "fused":  # before torch.compile traces a forward (the op is registered lazily)
            relpos_kernel.register_op()

    @classmethod
    def from_attention(cls, src: vit.Attention, mode: str = "mask") -> FastViTAttention:
        return cls(src, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected tokens (B, H, W, 3C) → attention output (B, H, W, C), before the output projection."""
        B, H, W, C3 = qkv.shape
        C = C3 // 3
        nh, hd, L = self.num_heads, self.head_dim, H * W
        q, k, v = qkv.reshape(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, hd)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            rel_h = vit.relative_position_table(H, H, self.rel_pos_h).to(q.dtype)  # (H, H, hd)
            rel_w = vit.relative_position_table(W, W, self.rel_pos_w).to(q.dtype)  # (W, W, hd)
            qg = q.reshape(B, nh, H, W, hd)
            bias_w = torch.einsum("bnhwc,wkc->bnhwk", qg, rel_w).reshape(B, nh, L, W)
            bias_h = torch.einsum("bnhwc,hkc->bnhwk", qg, rel_h).reshape(B, nh, L, H)
            if self.mode == "fused" and relpos_kernel.available(q.device, q.dtype) and relpos_kernel.supports((H, W), hd):
                # bias_h stays (L, H) row-major although the kernel reads it one key row at a time: on the
                # H200 a transposed copy (queries contiguous) made the kernel 1-13% slower, not faster
                # (bench/results/gpu_2026-11-26b/relpos_kernel.json, "fused" against "fused_bias_h_rows").
                out = relpos_kernel.relpos_attention(q, k, v, bias_h, bias_w, (H, W))
            elif self.mode == "fold":
                out = _folded_attention(q, k, v, bias_h, bias_w, H, W)
            elif self.mode == "flex":
                out = _flex_attention(q, k, v, bias_h, bias_w, W)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=_padded_bias(bias_h, bias_w))
        return out.transpose(1, 2).reshape(B, H, W, C)


class FastWindowBlock(vit.Block):
    """A windowed :class:`~segany.modeling.image_encoder.Block` whose projections skip the window padding.

    The reference pads the normalised tokens to whole windows (64 → 70 per side at 1024 px, 20% more rows)
    and runs ``qkv`` and ``proj`` on the padding too. Here ``qkv`` runs on the real tokens; the padding is
    filled with what ``qkv`` gives a zero token, its bias, so the keys and values the windows see are the
    reference's; ``proj`` runs after the padding is cropped away, since those rows are discarded anyway.
    Same maths, 16% fewer rows in two of the block's four GEMMs.

    With ``fused=True`` (``attention="fused"``) and the kernel available on the tensors' device, the
    window attention is :mod:`segany.kernels.window_attention` instead: it reads the projection where it
    lies, so no padded or partitioned copy, no bias tensors and no merge are made; elsewhere the block
    folds the bias as ``attention="fold"`` does.
    """

    attn: FastViTAttention
    fused: bool

    @classmethod
    def from_block(cls, src: vit.Block, attn: FastViTAttention, fused: bool = False) -> FastWindowBlock:
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.norm1, block.attn, block.norm2, block.mlp, block.window = src.norm1, attn, src.norm2, src.mlp, src.window
        block.fused = fused
        if fused:
            window_kernel.register_op()
        return block

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return (self.fused and self.attn.use_rel_pos and window_kernel.available(x.device, x.dtype)
                and window_kernel.supports(self.window, self.attn.head_dim))

    def offset_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (2·window − 1, D) rel-pos tables the window kernel reads (resampled as the reference does)."""
        w, attn = self.window, self.attn
        return (window_kernel.offset_table(vit.relative_position_table(w, w, attn.rel_pos_h)),
                window_kernel.offset_table(vit.relative_position_table(w, w, attn.rel_pos_w)))

    def fused_windows(self, qkv: torch.Tensor) -> torch.Tensor:
        """Window attention by the kernel, from the projection *with* its bias to (B, H, W, C) before ``proj``."""
        table_h, table_w = self.offset_tables()
        return window_kernel.window_attention(qkv, self.attn.qkv.bias, table_h, table_w, self.window,
                                              self.attn.num_heads)

    def folded_windows(self, qkv_nobias: torch.Tensor) -> torch.Tensor:
        """Window attention without the kernel, from the projection *without* its bias (added after padding,
        see the class docstring) to (B, H, W, C) before ``proj``."""
        windows, padded = vit.window_partition(qkv_nobias, self.window)
        if self.attn.qkv.bias is not None:
            windows = windows + self.attn.qkv.bias
        return vit.window_unpartition(self.attn.attend(windows), self.window, padded, qkv_nobias.shape[1:3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qkv_layer = self.attn.qkv
        if self._kernel_applies(x):
            out = self.fused_windows(qkv_layer(h))
        elif isinstance(qkv_layer, quant_linear.QuantLinear):
            out = self.folded_windows(qkv_layer.matmul(h))
        else:
            out = self.folded_windows(F.linear(h, qkv_layer.weight))
        x = x + self.attn.proj(out)
        return x + self.mlp(self.norm2(x))


def _padded_bias(bias_h: torch.Tensor, bias_w: torch.Tensor) -> torch.Tensor:
    """(B, nh, L, H) ⊕ (B, nh, L, W) → (B, nh, L, L) view into storage whose rows are 8-aligned."""
    B, nh, L, H = bias_h.shape
    W = bias_w.shape[-1]
    padded = (L + 7) // 8 * 8
    if padded == L:
        return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, nh, L, L)
    buf = bias_h.new_empty(B, nh, L, padded)
    torch.add(bias_h[..., :, None], bias_w[..., None, :], out=buf[..., :L].view(B, nh, L, H, W))
    return buf[..., :L]


def _folded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                      bias_w: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Attention with the decomposed bias folded into q·k: no (L, L) tensor, flash kernels allowed."""
    B, nh, L, hd = q.shape
    rows = torch.arange(L, device=q.device) // W
    cols = torch.arange(L, device=q.device) % W
    onehot_h = F.one_hot(rows, H).to(q.dtype).expand(B, nh, L, H)
    onehot_w = F.one_hot(cols, W).to(q.dtype).expand(B, nh, L, W)
    qf = torch.cat([q * (hd ** -0.5), bias_h, bias_w], dim=-1)
    kf = torch.cat([k, onehot_h, onehot_w], dim=-1)
    width = (qf.shape[-1] + 7) // 8 * 8
    pad = width - qf.shape[-1]
    if pad:
        qf, kf = F.pad(qf, (0, pad)), F.pad(kf, (0, pad))
    # Flash kernels want equal q/k/v head sizes; zero columns in v cost compute but not correctness.
    vf = F.pad(v, (0, width - hd))
    return F.scaled_dot_product_attention(qf, kf, vf, scale=1.0)[..., :hd]


_COMPILED_FLEX: Callable[..., torch.Tensor] | None = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                    bias_w: torch.Tensor, W: int) -> torch.Tensor:
    """Attention plus the decomposed bias through ``flex_attention``: the bias is gathered per score
    inside the kernel, so the (L, L) matrix is never written and the head keeps its width."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        return score + bias_h[b, h, q_idx, kv_idx // W] + bias_w[b, h, q_idx, kv_idx % W]

    global _COMPILED_FLEX
    if q.is_cuda and not torch.compiler.is_compiling():
        # Uncompiled flex_attention materialises the scores; the compiled one is the fused kernel.
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX(q, k, v, score_mod=score_mod)
    import warnings

    with warnings.catch_warnings():  # the "use torch.compile" hint: on CPU this path is for correctness
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, score_mod=score_mod)


class _GemmPatchEmbed(nn.Module):
    """:class:`~segany.modeling.image_encoder.PatchEmbed` as one GEMM over the unfolded patches.

    For the 16×16, stride-16 bf16 convolution cuDNN picked an implicit-GEMM kernel that took 2.1 ms per
    batch of 8 on an H200, 7% of the compiled ViT-B (``bench/results/gpu_2026-11-26``); the patches are a
    reshape away from a plain (tokens, 3·16·16) × (3·16·16, C) product. Same sums, another order.
    """

    def __init__(self, src: vit.PatchEmbed) -> None:
        super().__init__()
        self.proj = src.proj  # shares the convolution's parameters (and its state-dict keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj.kernel_size[0]
        B, C, Hs, Ws = x.shape
        h, w = Hs // p, Ws // p
        x = x[:, :, : h * p, : w * p]  # a strided convolution without padding drops the remainder too
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h, w, C * p * p)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # (C_out, C·p·p), (c, i, j) order
        return F.linear(patches, weight, self.proj.bias)


class _Float32LayerNorm2d(nn.Module):
    """LayerNorm2d computing its statistics in fp32 whatever the input dtype (bf16 variance is too coarse)."""

    def __init__(self, src: LayerNorm2d) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = src.weight, src.bias, src.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(dim=1, keepdim=True)
        var = (xf - mean).square().mean(dim=1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]).to(x.dtype)


def _swap_modules(root: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    for name, child in list(root.named_children()):
        new = fn(child)
        if new is not None:
            setattr(root, name, new)
        else:
            _swap_modules(child, fn)
    return root


def make_fast_encoder(encoder: nn.Module, dtype: torch.dtype, *, attention: str = "mask",
                      channels_last: bool = False, quantize: str | None = None,
                      gelu_epilogue: bool = False) -> nn.Module:
    """A copy of ``encoder`` cast to ``dtype`` with fused-kernel attention; the original is not touched.

    ``quantize="int8"`` or ``"fp8"`` also runs the transformer blocks' linear layers as 8-bit GEMMs
    (:mod:`segany.kernels.quant_linear`); the patch embedding and the neck stay in ``dtype``, since they
    are a few percent of the work and sit at the input and output where errors are not averaged away
    (TinyViT: every linear layer, all in its attention blocks; its convolutions stay in ``dtype``).
    ``gelu_epilogue=True`` computes the ViT blocks' MLP GELU inside the first GEMM
    (:mod:`segany.kernels.gelu_epilogue`; tanh form on CUDA).
    """
    if quantize not in QUANTIZE:
        raise InputError(f"quantize must be one of None, 'int8', 'fp8', got {quantize!r}")
    if gelu_epilogue and quantize is not None:
        raise InputError(f"gelu_epilogue=True and quantize={quantize!r} cannot be combined: the 8-bit GEMMs "
                         "have no GELU epilogue; drop one of them")
    param = next(encoder.parameters(), None)
    attention = resolve_attention(attention, param.device if param is not None else "cpu")
    enc = copy.deepcopy(encoder)

    def swap(m: nn.Module) -> nn.Module | None:
        if isinstance(m, vit.Block):
            mode = attention
            if attention in ("mixed", "fused"):  # fold in windows (or their kernel); mask or the kernel globally
                mode = "fold" if m.window > 0 else ("mask" if attention == "mixed" else "fused")
            attn = FastViTAttention.from_attention(m.attn, mode)
            if m.window > 0:
                return FastWindowBlock.from_block(m, attn, fused=attention == "fused")
            m.attn = attn
            return m
        if isinstance(m, vit.PatchEmbed):
            return _GemmPatchEmbed(m)
        if isinstance(m, LayerNorm2d) and dtype != torch.float32:
            return _Float32LayerNorm2d(m)
        return None

    _swap_modules(enc, swap)
    blocks = [m for m in enc.modules() if isinstance(m, vit.Block)]
    if gelu_epilogue and sum(gelu_kernel.convert_mlps(b) for b in blocks) == 0:
        raise InputError(f"gelu_epilogue=True: {type(encoder).__name__} has no ViT block MLP with an exact GELU "
                         "to fuse; leave gelu_epilogue unset for this model")
    enc = enc.to(dtype)
    if quantize is not None:  # after the cast: .to(dtype) would turn fp8 buffers back into dtype
        # ViT: the blocks' linears. TinyViT has linear layers only in its attention blocks, so all of them.
        targets = blocks or [enc]
        if sum(quant_linear.convert_linears(t, quantize, dtype) for t in targets) == 0:
            raise InputError(f"quantize={quantize!r}: {type(encoder).__name__} has no linear layer the 8-bit "
                             "kernels take; leave quantize unset for this model")
    if channels_last:
        enc = enc.to(memory_format=torch.channels_last)
    return enc.eval().requires_grad_(False)


def make_fast_decoder(decoder: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the mask decoder in ``dtype`` (LayerNorm2d statistics stay fp32)."""
    dec = copy.deepcopy(decoder)
    if dtype != torch.float32:
        _swap_modules(dec, lambda m: _Float32LayerNorm2d(m) if isinstance(m, LayerNorm2d) else None)
    return dec.to(dtype).eval().requires_grad_(False)


class FastMaskDecoder(nn.Module):
    """The mask decoder's maths with less memory traffic; shares the parameters of ``decoder``.

    One side of every cross attention holds a handful of prompt tokens (T, ~7), the other the 4096
    image tokens, so the image-side projections are folded into the few-token side instead of being
    applied to 4096 rows:

    * Heads become one GEMM: the T token queries (keys) of the nh heads go on the diagonal of an
      (inner, nh·T) block matrix, so scores for all heads are ``image_tokens @ block`` with no head
      transposes.
    * Token→image: ``softmax(q·(x+pe)·Wkᵀ)`` needs only ``(q·Wk)`` (the key bias adds a per-row constant
      that softmax drops) and ``P·(x·Wvᵀ + bv) = (P·x)·Wvᵀ + bv`` (rows of P sum to 1), so the image keys
      and values are never materialized.
    * Image→token: ``q_img = (x+pe)·Wqᵀ + bq`` is folded into the score GEMM and ``out_proj`` into the
      value block (``P·(V·Woᵀ + bo/nh)``, each of the nh heads' rows sums to 1), so the image side costs
      two skinny GEMMs and one fused ``keys + P·M`` update.
    * Without a mask prompt, the first block's image-side inputs depend only on the image, so their
      projection is cached per embedding and a click only pays for the rest.
    * The 2×2 stride-2 transposed convolutions of the upscaler run as GEMMs on channels-last tokens whose
      output columns are ordered (sub-row, sub-col, channel), so no pixel shuffle is needed before the
      hypernetwork product; only the returned masks are computed, and one small permute of the (B, M, ·)
      logits restores the image layout.

    fp32 results agree with :class:`MaskDecoder` to rounding (~1e-6), not bit for bit.
    """

    def __init__(self, decoder: nn.Module, image_pe: torch.Tensor, token_decoder: nn.Module | None = None) -> None:
        """``token_decoder``: a decoder with the same weights whose modules run the few-token side (e.g. the
        fp32 reference beside a bf16 ``decoder`` on CPU, where tiny bf16 GEMMs cost more than fp32 ones);
        it is held without being registered, so moving or casting this module never touches it."""
        super().__init__()
        self.dec = decoder
        self._tok = (token_decoder if token_decoder is not None else decoder,)
        self.grid = tuple(image_pe.shape[-2:])
        for name, value in self._derived(image_pe).items():
            self.register_buffer(name, value, persistent=False)
        # (embedding tensor, its version, keys, projection); holding the tensor keeps its memory from being
        # reused by another image, so an identity check cannot be fooled.
        self._cache: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def _derived(self, image_pe: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors computed once from the decoder's weights and the positional encoding."""
        pe = image_pe.flatten(2).transpose(1, 2)[0]  # (HW, C)
        w, add = layer0_image_projection(self.dec.transformer, pe)
        up1_w, up1_b, up2_w, up2_b = upscaler_gemms(self.dec)
        # F.linear takes (out, in): rows ordered (sub-row, sub-col, channel).
        return {"key_pe": pe.contiguous(), "w_0": w, "add_0": add, "up1_w": up1_w.T.contiguous(), "up1_b": up1_b,
                "up2_w": up2_w.T.contiguous(), "up2_b": up2_b}

    @torch.no_grad()
    def refresh(self, image_pe: torch.Tensor) -> None:
        """Recompute the derived tensors after the decoder's weights changed, in place (compiled code and CUDA
        graphs keep reading the same storage), and drop the per-image cache."""
        for name, value in self._derived(image_pe).items():
            getattr(self, name).copy_(value)
        self._cache = None

    @staticmethod
    def _image_proj(keys: torch.Tensor, w: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        B, N, C = keys.shape
        if B == 1:
            return torch.addmm(add, keys[0], w)[None]
        return torch.matmul(keys, w) + add

    @staticmethod
    def _block(x: torch.Tensor, nh: int, scale: float = 1.0) -> torch.Tensor:
        """(B, T, nh·d) → (B, nh·d, nh·T) block-diagonal: head h's (d, T) block at rows/columns of head h."""
        B, T, D = x.shape
        eye = torch.eye(nh, dtype=x.dtype, device=x.device)
        return torch.einsum("btnd,nm->bndmt", x.view(B, T, nh, D // nh) * scale, eye).reshape(B, D, nh * T)

    @staticmethod
    def _unblock(o: torch.Tensor, nh: int) -> torch.Tensor:
        """(B, nh·T, nh·d) with head h's rows read against every head's columns → (B, T, nh·d), diagonal blocks."""
        B, R, D = o.shape
        T, d = R // nh, D // nh
        return torch.diagonal(o.view(B, nh, T, nh, d), dim1=1, dim2=3).transpose(-1, -2).reshape(B, T, D)

    @staticmethod
    def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batched matmul; with batch 1 a 2-D GEMM, which takes transposed operands without a copy."""
        if a.shape[0] == 1 and b.shape[0] == 1:
            return torch.mm(a[0], b[0])[None]
        return torch.matmul(a, b)

    def _t2i(self, attn: nn.Module, img: nn.Module, queries_pe: torch.Tensor, keys: torch.Tensor,
             keys_pe: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Token → image attention. ``kv``: precomputed image keys/values (B|1, N, ci); otherwise they are
        folded (see class docstring) from ``keys`` (values) and ``keys_pe`` (keys)."""
        nh = attn.num_heads
        q = attn.q_proj(queries_pe)
        B, T, D = q.shape
        qb = self._block(q, nh, (D // nh) ** -0.5).transpose(1, 2)  # (B, nh·T, ci)
        if kv is not None:
            p = self._mm(qb.to(keys.dtype), kv[0].transpose(1, 2)).softmax(dim=-1)  # (B, nh·T, N)
            o = self._mm(p, kv[1]).to(q.dtype)  # (B, nh·T, ci)
        else:
            assert keys_pe is not None
            a = self._mm(qb, attn.k_proj.weight[None]).to(keys.dtype)
            p = self._mm(a, keys_pe.transpose(1, 2)).softmax(dim=-1)
            o = F.linear(self._mm(p, keys).to(q.dtype), attn.v_proj.weight, attn.v_proj.bias)
        return attn.out_proj(self._unblock(o, nh))

    def _i2t(self, attn: nn.Module, img: nn.Module, keys: torch.Tensor, keys_pe: torch.Tensor | None, q_img: torch.Tensor | None,
             queries: torch.Tensor, queries_pe: torch.Tensor) -> torch.Tensor:
        """Image → token attention; returns ``keys + attention output`` (before the block's norm).

        Scores are laid out (B, nh, T, N) so the softmax over each head's T tokens runs along a
        strided axis of long rows (a (N, nh, T) softmax over the last axis of length T is ~20× slower).
        """
        nh = attn.num_heads
        k, v = attn.k_proj(queries_pe), attn.v_proj(queries)
        B, T, D = k.shape
        kbt = self._block(k, nh, (D // nh) ** -0.5).transpose(1, 2)  # (B, nh·T, ci)
        if q_img is not None:
            s = self._mm(kbt.to(keys.dtype), q_img.transpose(1, 2))  # (B, nh·T, N)
        else:
            assert keys_pe is not None
            s = self._mm(self._mm(kbt, attn.q_proj.weight[None]).to(keys.dtype), keys_pe.transpose(1, 2))
            s = s + torch.matmul(kbt, attn.q_proj.bias).to(keys.dtype)[..., None]
        N = s.shape[-1]
        p = s.view(-1, nh, T, N).softmax(dim=2).view(-1, nh * T, N)
        # Each head's T weights sum to 1, so adding bo/nh to every value row adds bo once per image token.
        m = (F.linear(self._block(v, nh).transpose(1, 2), attn.out_proj.weight) + attn.out_proj.bias / nh).to(keys.dtype)
        if keys.shape[0] == 1 and p.shape[0] == 1:
            return torch.addmm(keys[0], p[0].t(), m[0])[None]
        return keys + torch.matmul(p.transpose(1, 2), m)

    def _layer0_image_side(self, features: torch.Tensor, dense: torch.Tensor, cacheable: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if cacheable and c is not None and c[0] is features and c[1] == features._version:
            return c[2], c[3]
        keys = (features + dense.to(features.dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        proj = self._image_proj(keys, self.w_0, self.add_0)
        if cacheable:  # never mutated otherwise, so graph capture and torch.compile see no side effect
            self._cache = (features, features._version, keys, proj)
        return keys, proj

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, multimask_output: bool, cacheable: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same inputs and outputs as ``MaskDecoder.forward``. ``cacheable``: ``dense`` is the no-mask
        embedding, so the first block's image side may be reused while ``image_embeddings`` is the same
        tensor (never set it inside CUDA-graph capture or torch.compile)."""
        dec, tok = self.dec, self._tok[0]
        t, tt = dec.transformer, tok.transformer
        B = sparse.shape[0]
        out_tokens = torch.cat([tok.iou_token.weight, tok.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(B, -1, -1), sparse.to(out_tokens.dtype)], dim=1)
        feats = image_embeddings if image_embeddings.shape[0] == B else image_embeddings.expand(B, -1, -1, -1)
        if cacheable and image_embeddings.shape[0] == 1:  # one image, B prompts: its image side is shared
            keys, proj = self._layer0_image_side(image_embeddings, dense[:1], True)
        else:
            keys, proj = self._layer0_image_side(feats, dense, False)
        first = t.layers[0]
        ci = first.cross_attn_token_to_image.internal_dim
        k_t2i, v_t2i, q_i2t = proj.split([ci, ci, first.cross_attn_image_to_token.internal_dim], dim=-1)

        def t2i(i: int, attn: nn.Module, img: nn.Module, queries_pe: torch.Tensor, keys: torch.Tensor,
                keys_pe: torch.Tensor | None) -> torch.Tensor:
            return self._t2i(attn, img, queries_pe, keys, keys_pe, (k_t2i, v_t2i) if i == 0 else None)

        def i2t(i: int, attn: nn.Module, img: nn.Module, keys: torch.Tensor, keys_pe: torch.Tensor | None,
                queries: torch.Tensor, queries_pe: torch.Tensor) -> torch.Tensor:
            return self._i2t(attn, img, keys, keys_pe, q_i2t if i == 0 else None, queries, queries_pe)

        queries, keys = run_two_way(tt, t, tokens, keys, self.key_pe, t2i=t2i, i2t=i2t)
        iou = tok.iou_prediction_head(queries[:, 0])
        sel = range(1, dec.num_mask_tokens) if multimask_output else range(0, 1)
        hyper = torch.stack([tok.output_hypernetworks_mlps[j](queries[:, 1 + j]) for j in sel], dim=1)
        masks = self._upscale_masks(keys, hyper.to(keys.dtype))
        return masks, iou[:, sel.start:sel.stop]

    def _upscale_masks(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """ConvT(2, 2) → LayerNorm2d → GELU → ConvT(2, 2) → GELU, then ``hyper @ up``: (B, M, 4h, 4w).

        Both transposed convolutions write their 2×2 sub-pixels as extra rows of channels-last tokens,
        so pixels stay in (h, w, a1, b1, a2, b2) order until the (B, M) logits are permuted once.
        """
        _, ln, act1, _, act2 = self.dec.output_upscaling
        B, N, _ = keys.shape
        c1, c2 = self.up1_w.shape[0] // 4, self.up2_w.shape[0] // 4
        x = F.linear(keys, self.up1_w, self.up1_b).view(B, N * 4, c1)
        x = act1(F.layer_norm(x, (c1,), ln.weight, ln.bias, ln.eps))
        x = act2(F.linear(x, self.up2_w, self.up2_b)).view(B, N * 16, c2)
        M = hyper.shape[1]
        m = self._mm(x, hyper.transpose(1, 2))  # (B, 16·HW, M)
        h, w = self.grid
        return m.view(B, h, w, 2, 2, 2, 2, M).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(B, M, 4 * h, 4 * w)


# ------------------------------------------------------------------ pieces shared with the ONNX click graph
TokenToImage = Callable[[int, nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
ImageToToken = Callable[[int, nn.Module, nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
                        torch.Tensor]


def run_two_way(tok: nn.Module, img: nn.Module, tokens: torch.Tensor, keys: torch.Tensor, key_pe: torch.Tensor, *,
                t2i: TokenToImage, i2t: ImageToToken,
                norm4: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer's blocks and final attention, with the image-side attention maths supplied.

    The token side (self-attention, norms, MLP) runs on ``tok``'s modules; the image side is the caller's:
    ``t2i(i, attn_tok, attn_img, queries_pe, keys, keys_pe)`` returns the token update of block ``i``'s
    token→image attention (``i == len(layers)``: the final attention) and
    ``i2t(i, attn_tok, attn_img, keys, keys_pe, queries, queries_pe)`` returns ``keys`` plus the
    image→token update, before ``norm4`` (``norm4(module, x)``, default ``module(x)``). ``keys_pe`` is
    ``keys + key_pe``, formed once per block and ``None`` in block 0, whose image-side projections callers
    precompute per image. ``img`` holds the same weights as ``tok`` (possibly in another dtype).

    Shared by :class:`FastMaskDecoder` and the ONNX click graph (:mod:`segany.export.onnx_split`).
    """
    queries, query_pe = tokens, tokens
    for i, (layer, layer_img) in enumerate(zip(tok.layers, img.layers, strict=True)):
        if layer.skip_first_layer_pe:  # block 0: the queries already are the prompt encodings
            queries = layer.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q, q, queries)
        queries = layer.norm1(queries)
        keys_pe = keys + key_pe if i > 0 else None
        queries = layer.norm2(queries + t2i(i, layer.cross_attn_token_to_image, layer_img.cross_attn_token_to_image,
                                            queries + query_pe, keys, keys_pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = i2t(i, layer.cross_attn_image_to_token, layer_img.cross_attn_image_to_token, keys, keys_pe, queries,
                   queries + query_pe)
        keys = norm4(layer_img.norm4, keys) if norm4 is not None else layer_img.norm4(keys)
    n = len(tok.layers)
    update = t2i(n, tok.final_attn_token_to_image, img.final_attn_token_to_image, queries + query_pe, keys,
                 keys + key_pe)
    return tok.norm_final_attn(queries + update), keys


def _decoder_sources(model: Sam) -> list[torch.Tensor]:
    """The tensors FastPath derives values from once: the positional encoding's matrix, the first block's
    image-side projections and the upscaler."""
    layer = model.mask_decoder.transformer.layers[0]
    mods = [layer.cross_attn_token_to_image.k_proj, layer.cross_attn_token_to_image.v_proj,
            layer.cross_attn_image_to_token.q_proj, *model.mask_decoder.output_upscaling]
    return [model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
            *(t for m in mods for t in m.parameters(recurse=False))]


def _versions(tensors: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """In-place changes bump ``_version``; a replaced ``.data`` changes the storage pointer."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


def layer0_image_projection(transformer: nn.Module, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first block's image-side projections as one affine map of the image tokens ``x`` (HW, C).

    Returns ``w`` (C, 3ci) and ``add`` (HW, 3ci): ``x @ w + add`` is [token→image keys (x+pe)·Wkᵀ+bk |
    token→image values x·Wvᵀ+bv | image→token queries (x+pe)·Wqᵀ+bq]; ``pe`` (HW, C) is the dense
    positional encoding. Without a mask prompt nothing here depends on the click, so it is cached per image.
    """
    layer = transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    w = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight]).T  # (C, 3ci)
    add = torch.cat([pe @ t2i.k_proj.weight.T + t2i.k_proj.bias, t2i.v_proj.bias.expand(pe.shape[0], -1),
                     pe @ i2t.q_proj.weight.T + i2t.q_proj.bias], dim=1)
    return w.contiguous(), add.contiguous()


def upscaler_gemms(decoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's two 2×2 stride-2 transposed convolutions as GEMMs on channels-last tokens.

    Returns ``up1_w`` (C, 4·c1), ``up1_b`` (4·c1,), ``up2_w`` (c1, 4·c2), ``up2_b`` (4·c2,): output columns
    are ordered (sub-row, sub-col, channel), so each output row holds one token's 2×2 sub-pixels.
    """
    up1, _, _, up2, _ = decoder.output_upscaling
    # ConvTranspose2d weight (in, out, 2, 2) → (in, 2·2·out)
    w1 = up1.weight.permute(0, 2, 3, 1).reshape(up1.weight.shape[0], -1)
    w2 = up2.weight.permute(0, 2, 3, 1).reshape(up2.weight.shape[0], -1)
    return w1.contiguous(), up1.bias.repeat(4).contiguous(), w2.contiguous(), up2.bias.repeat(4).contiguous()


def upscale_cropped(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """``interpolate(low_res, (S, S))[..., :h, :w]`` without computing the rows and columns cropped away
    (:func:`segany.transforms.cropped_upsample_extent` says which are kept, and why they come out identical)."""
    extent = cropped_upsample_extent(low_res.shape[-1], img_size, input_size)
    if extent is None:  # not an integer scale: fall back to the plain two-step form
        return F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)[
            ..., : input_size[0], : input_size[1]]
    rows, cols, k = extent
    up = F.interpolate(low_res[..., :rows, :cols], (rows * k, cols * k), mode="bilinear", align_corners=False)
    return up[..., : input_size[0], : input_size[1]]


# ------------------------------------------------------------------------------------------ CUDA graphs
class _GraphCache:
    """One captured CUDA graph per input signature; replays copy inputs into static buffers.

    A failed capture (an op that syncs, an allocator issue) disables graphs with a warning and the
    caller's eager function is used, so a graph problem never breaks prediction.
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[Any, tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = OrderedDict()
        self.enabled = True
        self.pool: Any = None

    def __call__(self, key: Any, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, ...]:
        """Run ``fn(*inputs)``; ``key`` must identify everything ``fn`` closes over (sizes, flags)."""
        if not self.enabled:
            return fn(*inputs)
        full_key = (key, tuple((tuple(t.shape), t.dtype) for t in inputs))
        entry = self.entries.get(full_key)
        if entry is None:
            try:
                entry = self._capture(fn, inputs)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
                log.warning("CUDA graph capture failed (%s); running the decoder eagerly", exc)
                self.enabled = False
                torch.cuda.synchronize()
                return fn(*inputs)
            self.entries[full_key] = entry
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(full_key)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs, strict=True):
            dst.copy_(src)
        graph.replay()
        # Clone: the next replay overwrites the static outputs.
        return tuple(t.clone() for t in static_out)

    def _capture(self, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]) -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        static_in = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels (cuBLAS handles, autotuning) outside the capture
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(*static_in)
        return graph, static_in, static_out


def mode_uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile in ``mode`` replays CUDA graphs on CUDA ("reduce-overhead", "max-autotune", or
    any mode with Inductor's ``triton.cudagraphs`` switched on, as ``TORCHINDUCTOR_CUDAGRAPHS=1`` does), whose
    outputs live in memory the next replay reuses. Asked of Inductor, so a new mode is answered right; an
    unknown mode raises torch's own error when compiled."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    if getattr(inductor_config.triton, "cudagraphs", False):
        return True
    if mode is None:
        return False
    try:
        return bool(list_mode_options(mode).get("triton.cudagraphs", False))
    except (KeyError, RuntimeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ fast path
class FastPath:
    """Fast encoder and decoder for one :class:`Sam`, used by ``SamPredictor`` and :func:`encode_images`.

    Args:
        model: the fp32 model; it is not modified (the fast path keeps cast copies of the encoder and decoder).
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        compile: ``False``, ``True`` or a torch.compile mode for the encoder (e.g. ``"max-autotune"``, or
            ``"reduce-overhead"``, which replays it as CUDA graphs); the decoder is compiled with
            ``"reduce-overhead"`` on CUDA.
        cuda_graphs: capture decoder + post-processing in CUDA graphs (default: on for CUDA without compile).
        attention: ``"auto"`` (default; :func:`resolve_attention`), ``"mask"``, ``"fold"``, ``"mixed"``,
            ``"fused"`` or ``"flex"`` (see module docstring). The mode used is ``self.attention``.
        decoder_precision: dtype of the decoder copy; defaults to ``precision``.
        quantize: ``"int8"`` or ``"fp8"`` runs the encoder blocks' GEMMs in 8 bits with per-token and
            per-channel scales (needs ``precision="bf16"``; CUDA compute capability 8.0+ for int8, 8.9+
            for fp8; the CPU runs both, slowly, for checking accuracy). It costs accuracy (int8 less
            than fp8; docs/benchmarks.md) and pays off with ``compile``. Default ``None``.
        fast_decoder: run :class:`FastMaskDecoder` (fused projections, per-image cache); default on
            unless the precision is fp32, where the reference decoder keeps results bit-exact.
        channels_last: channels-last memory for the encoder copy (default: on CUDA for TinyViT, whose
            convolutions profit; the ViT is linear layers on channels-last tokens already).
        gelu_epilogue: compute the ViT blocks' MLP GELU in the first GEMM's cuBLASLt epilogue
            (:mod:`segany.kernels.gelu_epilogue`: one pass over the MLP's widest tensor fewer, GELU's tanh
            form on CUDA). ``None`` (default) follows ``gelu_epilogue.DEFAULT_ON_CUDA`` for bf16/fp16 ViTs
            on CUDA without ``quantize``; ``True`` needs a reduced precision and a ViT encoder.
    """

    def __init__(self, model: Sam, *, precision: str = "auto", compile: bool | str = False,
                 cuda_graphs: bool | None = None, attention: str = "auto", decoder_precision: str | None = None,
                 channels_last: bool | None = None, fast_decoder: bool | None = None,
                 quantize: str | None = None, gelu_epilogue: bool | None = None) -> None:
        self.model = model
        self.device = model.device
        self.attention = attention = resolve_attention(attention, self.device, compile)
        self.precision = resolve_precision(precision, self.device)
        check_quantize(quantize, self.precision, self.device)
        self.quantize = quantize
        self.dtype = _DTYPES[self.precision]
        dec_precision = resolve_precision(decoder_precision or self.precision, self.device)
        self.decoder_dtype = _DTYPES[dec_precision]
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_has_native_bf16():
            # Measured 2026-11-26 on a 2-core AMD EPYC without AVX512-BF16: MobileSAM's (vit_t) set_image
            # took 56 s in bf16 against 1.7 s in fp32 (bf16 is converted in software there).
            log.warning("precision='bf16' on a CPU without native bf16 (no AMX-BF16 or AVX512-BF16 flag) is "
                        "emulated and can be many times slower than fp32; use precision='auto' or 'fp32' here "
                        "(or set SEGANY_CPU_BF16=1 if this CPU does have it and its flags are misread)")
        is_cuda = self.device.type == "cuda"
        if self.device.type == "cpu":
            cpu_alloc.tune_cpu_allocator()  # reuse freed click buffers instead of faulting in fresh pages
        is_tiny = model.cfg.encoder.kind == "tiny_vit"
        if channels_last is None:
            channels_last = is_cuda and is_tiny
        self.channels_last = channels_last
        if gelu_epilogue and self.dtype == torch.float32:
            raise InputError("gelu_epilogue=True needs precision 'bf16' or 'fp16': on CUDA it computes GELU's "
                             "tanh form, which the exact fp32 path must not")
        if gelu_epilogue is None:
            gelu_epilogue = gelu_kernel.default_on(self.device, self.dtype, vit=not is_tiny,
                                                   quantized=quantize is not None)
        self.gelu_epilogue = gelu_epilogue
        if self.dtype == torch.float32 and not channels_last:
            self.encoder = model.image_encoder  # fp32: the reference modules themselves, no copy
        else:
            self.encoder = make_fast_encoder(model.image_encoder, self.dtype, attention=attention,
                                             channels_last=channels_last, quantize=quantize,
                                             gelu_epilogue=gelu_epilogue)
        decoder = (model.mask_decoder if self.decoder_dtype == torch.float32
                   else make_fast_decoder(model.mask_decoder, self.decoder_dtype))
        with torch.no_grad():
            self._image_pe = model.prompt_encoder.get_dense_pe().to(self.decoder_dtype)
        # An fp32 decoder shares the model's parameters, so a weight change (load_state_dict, a training step)
        # must reach what was computed from them here; a low-precision decoder is a cast copy, a snapshot by
        # design (docs/speed.md). The versions of the few source tensors are compared before each click.
        self._sources = _decoder_sources(model) if self.decoder_dtype == torch.float32 else []
        self._source_versions = _versions(self._sources)
        if fast_decoder is None:
            fast_decoder = self.precision != "fp32"
        # On CPU the few-token side runs on the fp32 reference modules: tiny bf16 GEMMs are slower there.
        token_decoder = model.mask_decoder if not is_cuda else None
        self.decoder: nn.Module = (FastMaskDecoder(decoder, self._image_pe, token_decoder) if fast_decoder
                                   else decoder)
        # OpenCV's resize agrees with interpolate to rounding, not bit for bit: not for the exact fp32 decoder.
        self._opencv_post = self.device.type == "cpu" and (fast_decoder or self.decoder_dtype != torch.float32)
        self.compile = compile
        self._encode_fn: Callable[[torch.Tensor], torch.Tensor] = self.encoder
        self._encode_graphs = False  # the compiled encoder replays CUDA graphs (see encode)
        self._decode_fn: Callable[..., tuple[torch.Tensor, ...]] = self._decode_core
        if compile:
            compile_cache_dir()
            mode = compile if isinstance(compile, str) else None
            self._encode_fn = torch.compile(self.encoder, mode=mode, dynamic=False)
            self._encode_graphs = is_cuda and mode_uses_cuda_graphs(mode)
            if quantize == "int8":
                self._encode_fn = _with_int8_scaling_fused(self._encode_fn)
            self._decode_fn = torch.compile(self._decode_core, mode="reduce-overhead" if is_cuda else None,
                                            dynamic=False)
        use_graphs = (is_cuda and not compile) if cuda_graphs is None else (cuda_graphs and is_cuda)
        self._graphs = _GraphCache() if use_graphs else None
        self._lowp_features: tuple[torch.Tensor, int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ encoder
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized, padded images (B, 3, S, S) → fp32 embeddings (B, C, S/16, S/16)."""
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self._encode_graphs:
            return self._encode_fn(x).float().contiguous()
        # "reduce-overhead" and "max-autotune" replay CUDA graphs whose output the next replay overwrites.
        # A bf16 output is cast into a new tensor anyway; an fp32 one is the graph's own memory, so copy it,
        # or a predictor's stored embedding would change (or raise) when the next image is encoded.
        torch.compiler.cudagraph_mark_step_begin()
        out = self._encode_fn(x)
        return (out.clone(memory_format=torch.contiguous_format) if out.dtype == torch.float32
                else out.float().contiguous())

    # ------------------------------------------------------------------ decoder
    def _features_for_decoder(self, features: torch.Tensor) -> torch.Tensor:
        if self.decoder_dtype == features.dtype:
            return features
        c = self._lowp_features  # holds the fp32 tensor, so an identity check is safe
        if c is None or c[0] is not features or c[1] != features._version:
            c = self._lowp_features = (features, features._version, features.to(self.decoder_dtype))
        return c[2]

    def _decode_core(self, features: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, *,
                     multimask: bool, input_size: tuple[int, int], original_size: tuple[int, int],
                     return_logits: bool, threshold: float, cacheable: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.decoder, FastMaskDecoder):
            low_res, iou = self.decoder(features, self._image_pe, sparse, dense, multimask, cacheable)
        else:
            low_res, iou = self.decoder(features, self._image_pe, sparse, dense, multimask)
        low_res = low_res.float()
        if self._opencv_post and cpu_upscale.applies(low_res, original_size):  # eager CPU: several times faster
            return (cpu_upscale.upscale_logits(low_res, self.model.img_size, input_size, original_size,
                                               None if return_logits else threshold), iou.float(), low_res)
        masks = upscale_cropped(low_res, self.model.img_size, input_size)
        if tuple(input_size) != tuple(original_size):
            # When equal, this resize would be the identity (scale 1 samples pixel centres exactly).
            masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
        if not return_logits:
            masks = masks > threshold
        return masks, iou.float(), low_res

    @torch.no_grad()
    def decode(self, features: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None,
               boxes: torch.Tensor | None, mask_input: torch.Tensor | None, multimask_output: bool,
               input_size: tuple[int, int], original_size: tuple[int, int], return_logits: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder (fp32) → decoder + post-processing (fast dtype); all three in one CUDA graph when graphs
        are on, else the encoder eagerly and the rest eager or compiled."""
        if self._sources and _versions(self._sources) != self._source_versions:
            self._refresh_derived()
        feats = self._features_for_decoder(features)
        kwargs = dict(multimask=multimask_output, input_size=tuple(input_size), original_size=tuple(original_size),
                      return_logits=return_logits, threshold=float(self.model.mask_threshold))
        if self._graphs is not None:
            return self._decode_graphed(feats, points, boxes, mask_input, kwargs)
        sparse, dense = self.model.prompt_encoder(points, boxes, mask_input)
        sparse = sparse.to(self.decoder_dtype)
        if not (isinstance(self.decoder, FastMaskDecoder) and mask_input is None
                and not self.compile):  # else the cached image side makes dense unused after the first click
            dense = dense.to(self.decoder_dtype)
        if not self.compile:  # eager: reuse the prompt-free image side between clicks
            return self._decode_core(feats, sparse, dense, **kwargs, cacheable=mask_input is None)
        if self.device.type == "cuda":
            # reduce-overhead replays CUDA graphs whose outputs the next replay overwrites: clone them.
            torch.compiler.cudagraph_mark_step_begin()
            masks, iou, low_res = self._decode_fn(feats, sparse, dense, **kwargs)
            return masks.clone(), iou.clone(), low_res.clone()
        return self._decode_fn(feats, sparse, dense, **kwargs)

    @torch.no_grad()
    def _refresh_derived(self) -> None:
        self._image_pe.copy_(self.model.prompt_encoder.get_dense_pe().to(self.decoder_dtype))
        if isinstance(self.decoder, FastMaskDecoder):
            self.decoder.refresh(self._image_pe)
        self._source_versions = _versions(self._sources)

    def _decode_graphed(self, feats: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None,
                        boxes: torch.Tensor | None, mask_input: torch.Tensor | None, kwargs: dict[str, Any]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder, decoder and post-processing as one CUDA graph per prompt signature.

        For one click the prompt encoder is some two dozen tiny kernels whose launches cost host time on
        every click; inside the graph they cost one replay. Which prompts exist is part of the key; their
        shapes and dtypes are added by the cache.
        """
        has = (points is not None, boxes is not None, mask_input is not None)
        tensors = [t.contiguous() for t in (*(points or ()), boxes, mask_input) if t is not None]
        pe, dtype, core = self.model.prompt_encoder, self.decoder_dtype, self._decode_core

        def run(f: torch.Tensor, *prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            sparse, dense = pe(*_split_prompts(has, prompt))
            return core(f, sparse.to(dtype), dense.to(dtype), **kwargs)  # type: ignore[arg-type]

        assert self._graphs is not None
        masks, iou, low_res = self._graphs((tuple(sorted(kwargs.items())), has), run, (feats, *tensors))
        return masks, iou, low_res


def _with_int8_scaling_fused(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a compiled int8 encoder) run with Inductor's ``force_fuse_int_mm_with_mul`` on, which folds the
    per-token scale into the int8 GEMM (``_int_mm(a, b) * scale``, CUDA) in default mode too (torch 2.14 still
    applies it in its post-grad passes). Set only around the call, where compiling happens: it was set for the
    whole process, so every later ``torch.compile`` of the user's own code ran with it."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError:  # pragma: no cover - torch without Inductor
        return fn
    if not hasattr(inductor_config, "force_fuse_int_mm_with_mul"):  # pragma: no cover - an Inductor without it
        return fn

    def run(x: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(force_fuse_int_mm_with_mul=True):
            return fn(x)

    return run


def check_quantize(quantize: str | None, precision: str, device: torch.device | str) -> None:
    """Raise :class:`InputError` (saying what to pass instead) unless ``quantize`` can run with the
    resolved ``precision`` on ``device``."""
    if quantize not in QUANTIZE:
        raise InputError(f"quantize must be one of None, 'int8', 'fp8', got {quantize!r}")
    if quantize is None:
        return
    if precision != "bf16":
        raise InputError(f"quantize={quantize!r} runs with precision='bf16' (the 8-bit GEMMs write bf16), "
                         f"got precision={precision!r}; pass precision='bf16' (--precision bf16)")
    ok, why = quant_linear.supported(quantize, device)
    if not ok:
        raise InputError(f"quantize={quantize!r} is not available: {why}; leave quantize unset to use bf16")


def _split_prompts(has: tuple[bool, bool, bool], tensors: Sequence[torch.Tensor]
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
    """The flat tensors of a graph's inputs back into (points, boxes, mask_input); ``has`` says which exist."""
    it = iter(tensors)
    points = (next(it), next(it)) if has[0] else None
    boxes = next(it) if has[1] else None
    masks = next(it) if has[2] else None
    return points, boxes, masks


def enable_fast_path(predictor: Any, **options: Any) -> FastPath:
    """Give an existing ``SamPredictor`` a :class:`FastPath` built with ``options`` (e.g. ``precision="fp32",
    fast_decoder=True`` for a faster exact-to-rounding CPU decoder); returns it. Call before ``set_image``."""
    predictor.fast = FastPath(predictor.model, **options)
    predictor.reset_image()
    return predictor.fast


# ------------------------------------------------------------------------------------------ batches
def _as_uint8_images(images: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    from segany.data.images import to_rgb_uint8

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise InputError(f"images[{i}] is a {type(img).__name__}; pass (H, W, 3) numpy arrays")
        out.append(to_rgb_uint8(img))
    return out


@torch.no_grad()
def encode_images(model: Sam, images: Sequence[np.ndarray], *, batch_size: int = 8,
                  fast: FastPath | None = None, precision: str = "auto") -> tuple[torch.Tensor, list[tuple[int, int]],
                                                                                 list[tuple[int, int]]]:
    """Embed many RGB images in batches.

    Returns:
        embeddings (N, C, h, w) fp32 on the model's device, input sizes (resized, before padding) and
        original sizes, each a list of (H, W) — what ``SamPredictor.set_embedding`` takes per image.
    """
    from segany.transforms import ResizeLongestSide

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    imgs = _as_uint8_images(images)
    if not imgs:
        raise InputError("encode_images needs at least one image")
    fast = fast or FastPath(model, precision=precision)
    transform = ResizeLongestSide(model.img_size)
    chunks, input_sizes, original_sizes = [], [], []
    for start in range(0, len(imgs), batch_size):
        batch = []
        for img in imgs[start:start + batch_size]:
            resized = transform.apply_image(img)
            t = torch.as_tensor(np.ascontiguousarray(resized), device=model.device).permute(2, 0, 1)
            batch.append(model.preprocess(t[None].float())[0])
            input_sizes.append((int(resized.shape[0]), int(resized.shape[1])))
            original_sizes.append((int(img.shape[0]), int(img.shape[1])))
        chunks.append(fast.encode(torch.stack(batch)))
    return torch.cat(chunks), input_sizes, original_sizes



def auto_points_per_batch(device: torch.device | str, *, original_pixels: int = 1500 * 2250,
                          headroom: float = 0.5, cap: int = 1024) -> int:
    """Prompts per decoder batch for the automatic mask generator, sized to free accelerator memory.

    Per prompt the decoder holds a few (4096, 256) fp32 image-token tensors (~4 MiB each, ~20 live) and
    three mask logit maps at the original size; we use ``headroom`` of the free memory. CPUs get 64,
    a size whose working set stays in cache-friendly territory.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return 64
    free_bytes, _ = torch.cuda.mem_get_info(dev)
    per_prompt = 20 * 4 * 2**20 + 3 * 4 * (1024 * 1024 + original_pixels)
    n = int(free_bytes * headroom // per_prompt)
    return max(16, min(cap, n // 16 * 16))
