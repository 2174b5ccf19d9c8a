"""Attention with SAM's decomposed relative-position bias in one fused Triton kernel (inference).

Why a kernel: the bias of a global block is ``bias_h[q, row(k)] + bias_w[q, col(k)]``, rank-structured
but (L, L) once added. Handing it to SDPA as a mask means writing and reading 8·12·4096² bf16 values per
ViT-B layer at batch 8 (3.2 GB); on an H200 that bias plus the masked cuDNN kernel took 2.5 ms per global
layer, a third of the compiled encoder (``bench/results/gpu_2026-11-26/profile_vit_b_compiled.json``).
``flex_attention`` avoids the matrix but gathers two scalars per score and ran 5× slower still.

Here each key tile is one row of the key grid (``BLOCK_N`` ≥ the grid width ``W``), so inside a tile the
``bias_h`` term is one value per query (a (BLOCK_M,) vector) and the ``bias_w`` term is the same
(BLOCK_M, W) slab for every tile, loaded once per program. Scores never leave registers; the softmax is
the usual online (flash) one in fp32. A tile can also hold ``KR`` = 2 rows of the key grid, with a
``bias_h`` column per row: longer dots and half the accumulator rescales, for the autotuner to weigh.

The maths is exactly ``softmax(q·kᵀ·scale + bias) · v`` of :class:`segany.modeling.image_encoder.Attention`;
only summation order differs. It is meant for bf16/fp16: with fp32 inputs on a GPU, Triton's dots run in
TF32. CUDA only at speed; ``TRITON_INTERPRET=1`` runs it on CPU tensors for tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

try:  # Triton ships with CUDA builds of torch; without it the caller keeps the SDPA path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["available", "register_op", "relpos_attention", "supports"]

_MAX_BLOCK_N = 128  # one key-grid row per tile; wider rows would need several tiles per row


# Triton decides at decoration (import) time whether a kernel is compiled or interpreted, so this is read
# once too; a constant also keeps torch.compile from guarding on the environment in every forward.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel can run for ``dtype`` tensors on ``device`` (CUDA with Triton, or Triton's
    interpreter). Not bf16 under the interpreter: it computes bf16 ``tl.dot`` wrongly (Triton 3.8: errors of
    1e8 and more), so an interpreted bf16 encoder returned garbage; the caller falls back to its own attention."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    return _INTERPRET and dtype != torch.bfloat16


def supports(grid_hw: tuple[int, int], head_dim: int) -> bool:
    """Shapes the kernel handles: key rows of at most 128 tokens and heads of at most 128 channels."""
    return grid_hw[1] <= _MAX_BLOCK_N and head_dim <= 128


if triton is not None:

    def _configs() -> list[triton.Config]:
        if _INTERPRET:  # the interpreter is slow; one small config keeps tests fast
            return [triton.Config({"BLOCK_M": 16, "KR": 1}, num_warps=1, num_stages=1)]
        # KR key-grid rows a step: one is what was timed (2.46 ms a ViT-H global block on an H200,
        # 2026-11-27); two make 128-key dots and halve the softmax rescales of the accumulator. Two rows have
        # never run on a GPU, so the autotuner is offered them (at the two largest tiles) only when
        # SEGANY_RELPOS_TWO_ROWS=1, as the GPU bench sets it, until they are timed there.
        one_row = [triton.Config({"BLOCK_M": bm, "KR": 1}, num_warps=w, num_stages=s)
                   for bm in (64, 128) for w in (4, 8) for s in (2, 3)]
        if os.environ.get("SEGANY_RELPOS_TWO_ROWS") != "1":
            return one_row
        return [*one_row, *(triton.Config({"BLOCK_M": 128, "KR": 2}, num_warps=8, num_stages=s) for s in (2, 3))]

    # NH (heads) is in the key only: ViT-B and ViT-L share L and D but not their head count, so not their grid.
    @triton.autotune(configs=_configs(), key=["L", "H", "W", "D", "NH"])
    @triton.jit
    def _relpos_attention_kernel(
        Q, K, V, BH, BW, Out,
        sq_b, sq_n, sq_l, sq_d,
        sk_b, sk_n, sk_l, sk_d,
        sv_b, sv_n, sv_l, sv_d,
        sbh_b, sbh_n, sbh_l, sbh_h,
        sbw_b, sbw_n, sbw_l, sbw_w,
        so_b, so_n, so_l, so_d,
        L, H, W, D, NH, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT_D: tl.constexpr, BLOCK_D2: tl.constexpr, KR: tl.constexpr,
    ):
        BLOCK_K: tl.constexpr = KR * BLOCK_N  # keys a step: KR rows of the key grid, each in BLOCK_N slots
        pid_m, n = tl.program_id(0), tl.program_id(1)
        # 64-bit from the batch index on: b·stride passes 2³¹ elements at 410 ViT-H images a call.
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        row_in_step, col = offs_k // BLOCK_N, offs_k % BLOCK_N
        offs_d = tl.arange(0, BLOCK_D)
        in_m, in_n, in_d = offs_m < L, col < W, offs_d < D
        log2e = 1.4426950408889634  # scores in log2 units, so the exponentials are exp2
        # Inductor types a Python float argument as fp64 (Triton's own launcher as fp32): cast, or the
        # scores and the loop-carried softmax state turn fp64 under torch.compile and the kernel won't build.
        qk_scale2 = tl.cast(qk_scale, tl.float32) * log2e

        q = tl.load(Q + b * sq_b + n * sq_n + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d,
                    mask=in_m[:, None] & in_d[None, :], other=0.0)
        if SPLIT_D:  # channels BLOCK_D… of a head that is not a power of two (ViT-H: 80 = 64 + 16)
            offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)
            in_e = offs_e < D
            q2 = tl.load(Q + b * sq_b + n * sq_n + offs_m[:, None] * sq_l + offs_e[None, :] * sq_d,
                         mask=in_m[:, None] & in_e[None, :], other=0.0)
            k2_base = K + b * sk_b + n * sk_n + offs_e[:, None] * sk_d
            v2_base = V + b * sv_b + n * sv_n + offs_e[None, :] * sv_d
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
        # bias_w[q, col(k)] is the same for every key row: load the (BLOCK_M, W) slab once, in log2 units.
        bw = tl.load(BW + b * sbw_b + n * sbw_n + offs_m[:, None] * sbw_l + col[None, :] * sbw_w,
                     mask=in_m[:, None] & in_n[None, :], other=0.0).to(tl.float32) * log2e
        bw = tl.where(in_n[None, :], bw, float("-inf"))  # columns beyond the row width are not keys
        bh_base = BH + b * sbh_b + n * sbh_n + offs_m * sbh_l
        k_base = K + b * sk_b + n * sk_n + offs_d[:, None] * sk_d
        v_base = V + b * sv_b + n * sv_n + offs_d[None, :] * sv_d

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for r in range(0, H, KR):  # KR key-grid rows per step
            kr = r + row_in_step
            in_k = in_n & (kr < H)  # with KR > 1 the last step can run past the grid's last row
            keys = kr * W + col
            k = tl.load(k_base + keys[None, :] * sk_l, mask=in_d[:, None] & in_k[None, :], other=0.0)
            s = tl.dot(q, k)
            if SPLIT_D:
                k2 = tl.load(k2_base + keys[None, :] * sk_l, mask=in_e[:, None] & in_k[None, :], other=0.0)
                s += tl.dot(q2, k2)
            s = s * qk_scale2
            if KR == 1:  # one bias_h value per query for the whole step
                bh = tl.load(bh_base + r * sbh_h, mask=in_m, other=0.0).to(tl.float32) * log2e
                s = s + bh[:, None] + bw
            else:  # each key row of the step has its own bias_h column; rows past the grid are not keys
                bh = tl.load(bh_base[:, None] + kr[None, :] * sbh_h, mask=in_m[:, None] & in_k[None, :],
                             other=0.0).to(tl.float32) * log2e
                s = tl.where(in_k[None, :], s + bh + bw, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + keys[:, None] * sv_l, mask=in_k[:, None] & in_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if SPLIT_D:
                v2 = tl.load(v2_base + keys[:, None] * sv_l, mask=in_k[:, None] & in_e[None, :], other=0.0)
                acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + b * so_b + n * so_n + offs_m[:, None] * so_l + offs_d[None, :] * so_d,
                 acc.to(Out.dtype.element_ty), mask=in_m[:, None] & in_d[None, :])
        if SPLIT_D:
            acc2 = acc2 / l_i[:, None]
            tl.store(Out + b * so_b + n * so_n + offs_m[:, None] * so_l + offs_e[None, :] * so_d,
                     acc2.to(Out.dtype.element_ty), mask=in_m[:, None] & in_e[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def head_blocks(D: int) -> tuple[int, int]:
    """Channel tiles for a head of ``D``: (main, tail), tail 0 when one power-of-two tile is as small.

    Triton tiles are powers of two, so one tile would pad ViT-H's 80-channel heads to 128 and spend 60%
    more on both dots; a 64 tile plus a 16 tile covers them exactly.
    """
    whole = _pow2(D)
    main = max(16, 1 << (D.bit_length() - 1))
    tail = _pow2(D - main) if D > main else 0
    return (main, tail) if tail and main + tail < whole else (whole, 0)


def _launch(kernel: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
            bias_w: torch.Tensor, W: int, scale: float) -> torch.Tensor:
    """Allocate the output and launch ``kernel`` (the Triton kernel, or it wrapped for torch.compile)."""
    B, nh, L, D = q.shape
    out = _empty_out(q)  # (B, L, nh, D) storage, so the caller's transpose back to tokens is free
    block_d, block_d2 = head_blocks(D)

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(L, meta["BLOCK_M"]), nh, B)

    kernel[grid](  # type: ignore[index]
        q, k, v, bias_h, bias_w, out,
        *q.stride(), *k.stride(), *v.stride(), *bias_h.stride(), *bias_w.stride(), *out.stride(),
        L, L // W, W, D, nh, scale,
        BLOCK_N=_pow2(W), BLOCK_D=block_d, SPLIT_D=block_d2 > 0, BLOCK_D2=max(block_d2, 16),
    )
    return out


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    B, nh, L, D = q.shape
    return q.new_empty(B, L, nh, D).permute(0, 2, 1, 3)


_relpos_op: Callable[..., torch.Tensor] | None = None


def register_op() -> Callable[..., torch.Tensor] | None:
    """Register the kernel as the torch op ``segany::relpos_attention`` (once) and return it; None without
    Triton or on torch < 2.6.

    Not done at import: registering a Triton op makes torch scan its body, which imports Inductor, 1.5 s
    that every process importing the fast path paid at start on CPU too. :class:`segany.fast.FastViTAttention`
    calls this when it is built for ``"fused"``, so it has run before torch.compile traces a forward.
    """
    global _relpos_op
    if _relpos_op is not None or triton is None:
        return _relpos_op
    if not _INTERPRET and hasattr(torch.library, "triton_op"):
        # A registered Triton op: torch.compile keeps the launch inside its graph (no graph break per block)
        # and derives the output's shape by tracing this body.
        @torch.library.triton_op("segany::relpos_attention", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor,
               W: int, scale: float) -> torch.Tensor:
            return _launch(torch.library.wrap_triton(_relpos_attention_kernel), q, k, v, bias_h, bias_w, W, scale)
    elif hasattr(torch.library, "custom_op"):
        # Under Triton's interpreter the kernel cannot be traced, so it is an opaque op with a stated output
        # shape: the CPU tests still see torch.compile capture the fused attention as one node.
        @torch.library.custom_op("segany::relpos_attention", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor,
               W: int, scale: float) -> torch.Tensor:
            return _launch(_relpos_attention_kernel, q, k, v, bias_h, bias_w, W, scale)

        @op.register_fake
        def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor,
              W: int, scale: float) -> torch.Tensor:
            return _empty_out(q)
    else:  # pragma: no cover - torch < 2.6
        return None
    _relpos_op = op
    return op


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                     bias_w: torch.Tensor, grid_hw: tuple[int, int], scale: float | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias_h[.., row(k)] + bias_w[.., col(k)]) · v`` for (B, nh, L, D) inputs.

    ``bias_h`` (B, nh, L, H) and ``bias_w`` (B, nh, L, W) are the decomposed rel-pos terms for the
    (H, W) token grid (``L = H·W``, row-major). Returns (B, nh, L, D), a view of (B, L, nh, D) storage.
    """
    if triton is None:
        raise RuntimeError("the fused rel-pos attention needs Triton (it ships with CUDA builds of torch)")
    H, W = grid_hw
    B, nh, L, D = q.shape
    if L != H * W or not supports(grid_hw, D):
        raise ValueError(f"relpos_attention: grid {grid_hw} and head size {D} are not supported for L={L}")
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"relpos_attention: scale must be finite, got {scale}")
    op = _relpos_op if _relpos_op is not None else register_op()
    if op is None:  # pragma: no cover - torch < 2.6
        return _launch(_relpos_attention_kernel, q, k, v, bias_h, bias_w, W, scale)
    return op(q, k, v, bias_h, bias_w, W, scale)
