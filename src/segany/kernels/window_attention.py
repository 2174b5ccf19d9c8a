"""Windowed attention with SAM's relative-position bias in one Triton kernel, read straight from ``qkv``.

Why a kernel: ViT-H has 28 windowed blocks (14×14 windows), and on an H200 their attention took about
31 ms of a 116 ms compiled batch (``bench/results/gpu_2026-11-26c/profile_vit_h_compiled.json``) for about
2.5% of the encoder's FLOPs. Almost all of it was memory traffic around a small computation: padding the
token grid to whole windows and cutting it into windows, adding the qkv bias, two rel-pos einsums,
building the folded q/k that let SDPA take the bias, the flash kernel on those wider heads, and putting
the windows back together.

Here one program takes ``BLOCK_M`` queries of one window and one head and reads its queries, keys and
values from the (B, H, W, 3C) projection where they lie; the window padding is never written: a key
outside the image is what the reference's zero-padded token gives after ``qkv``, the bias alone. The
rel-pos terms come from two small dots of the queries with the (2·window−1, D) offset tables, picked per
query and key inside the kernel (a select-and-sum, or ``tl.gather`` with :data:`TERMS`), so neither the
(window², window) bias tensors nor a mask exist. The output goes to (B, H, W, C) token order, ready for
``proj``. The softmax is the online (flash) one in fp32 over ``KR`` key rows of the window per step, as in
:mod:`segany.kernels.relpos_attention`.

A one-pass variant (every key of a window in one tile, one plain softmax) was tried and removed on
2026-11-27: on an H200 its 80-channel Hopper tiles made illegal accesses or gave wrong sums, and where it
was right it made compiled ViT-B, ViT-L and ViT-H no faster (docs/benchmarks.md).

The maths is the reference block's (pad, partition, ``softmax(q·kᵀ·scale + rel_h + rel_w)·v``, merge,
crop); only summation order and where the rel-pos terms are rounded differ (fp32 here). For bf16/fp16; a
GPU runs fp32 dots in TF32. ``TRITON_INTERPRET=1`` runs it on CPU tensors for tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from segany.errors import InputError
from segany.kernels import relpos_attention as _relpos

triton, tl = _relpos.triton, _relpos.tl

__all__ = ["available", "offset_table", "register_op", "supports", "window_attention"]

_MAX_WINDOW = 32  # one window row per key tile, and 2·window − 1 offsets in one tile of at most 64

available = _relpos.available

# How each (query, key) pair's rel-pos terms are read out of the queries' dots with the offset tables:
# "select" (a select-and-sum over the offsets per key column and key row; what was timed) or "gather"
# (``tl.gather`` along the offsets, one register gather each: fewer instructions and live values, not yet
# timed on a GPU). An experiment switch read when the kernel is launched (or traced by torch.compile);
# ``SEGANY_WINDOW_TERMS`` sets it for a whole process, which is how the GPU benches compare the two.
TERMS = os.environ.get("SEGANY_WINDOW_TERMS", "select")
_TERMS = ("select", "gather")


def supports(window: int, head_dim: int) -> bool:
    """Windows of at most 32 tokens a side and heads of at most 128 channels."""
    return 1 <= window <= _MAX_WINDOW and head_dim <= 128


def offset_table(rel: torch.Tensor) -> torch.Tensor:
    """(w, w, D) per-pair table of :func:`~segany.modeling.image_encoder.relative_position_table` → (2w−1, D).

    For equal query and key sizes the pair (i, j) reads offset row ``i − j + w − 1``, so the first row of
    the pair table (reversed) and its first column hold every offset once. Taking them from the pair
    table keeps one definition of how a table trained at another size is resampled.
    """
    return torch.cat([rel[0].flip(0), rel[1:, 0]], dim=0)


if triton is not None:

    @triton.jit
    def _window_queries(pid_m, wid, NWY, NWX, HS, WS, WIN, BLOCK_M: tl.constexpr):
        """This program's image, window and query tile: (b, wy, wx, qr, qc, yq, xq, q_in), queries by row and
        column inside the window and on the token grid; ``q_in`` is False for queries on the padding (computed,
        never stored). ``b`` is 64-bit: b·stride of the (B, H, W, 3C) projection passes 2³¹ elements at 137
        ViT-H images a call, and would wrap in 32 bits."""
        b = (wid // (NWY * NWX)).to(tl.int64)
        wy = (wid % (NWY * NWX)) // NWX
        wx = wid % NWX
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qr, qc = offs_m // WIN, offs_m % WIN
        yq, xq = wy * WIN + qr, wx * WIN + qc
        q_in = (offs_m < WIN * WIN) & (yq < HS) & (xq < WS)
        return b, wy, wx, qr, qc, yq, xq, q_in

    @triton.jit
    def _pick_terms(rt, qpos, offs_t, slots, WIN, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
        """(BLOCK_M, BLOCK_S) rel-pos terms: slot j holds ``rt[q, qpos − slots[j] + WIN − 1]``, the term toward
        window row (or column) ``slots[j]``, picked by select-and-sum; slots ≥ WIN stay 0."""
        out = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
        for c in range(0, WIN):
            val = tl.sum(tl.where(offs_t[None, :] == (qpos - c + WIN - 1)[:, None], rt, 0.0), 1)
            out = tl.where(slots[None, :] == c, val[:, None], out)
        return out

    @triton.jit
    def _offset_index(qpos, kpos, WIN, BLOCK_T: tl.constexpr):
        """(queries, keys) offset rows ``qpos − kpos + WIN − 1`` for :func:`tl.gather`, clamped into the
        table's tile: a key slot past the window's end would point outside it (its score is masked)."""
        idx = qpos[:, None] - kpos[None, :] + WIN - 1
        return tl.minimum(tl.maximum(idx, 0), BLOCK_T - 1)

    @triton.jit
    def _query_terms(base, TH, TW, yq, xq, q_in, s_y, s_x, s_c, st_h, st_hd, st_w, st_wd, n, D, offs_c, in_c,
                     offs_t, in_t):
        """One channel tile of the queries, and its dots with both offset tables: q · table[offset] for
        every offset, of which the reference's rel_h / rel_w are entries."""
        q = tl.load(base + yq[:, None] * s_y + xq[:, None] * s_x + (n * D + offs_c[None, :]) * s_c,
                    mask=q_in[:, None] & in_c[None, :], other=0.0)
        th = tl.load(TH + offs_t[None, :] * st_h + offs_c[:, None] * st_hd, mask=in_c[:, None] & in_t[None, :],
                     other=0.0)
        tw = tl.load(TW + offs_t[None, :] * st_w + offs_c[:, None] * st_wd, mask=in_c[:, None] & in_t[None, :],
                     other=0.0)
        return q, tl.dot(q, th), tl.dot(q, tw)

    @triton.jit
    def _qkv_bias(BQKV, start, offs_c, in_c, HAS_BIAS: tl.constexpr):
        """One channel tile of the qkv bias from ``start`` (zeros without one; then never read)."""
        bias = tl.zeros(offs_c.shape, dtype=BQKV.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(BQKV + start + offs_c, mask=in_c, other=0.0)
        return bias

    @triton.jit
    def _keys(base, kv_off, k_in, bias, start, s_c, offs_c, in_c, HAS_BIAS: tl.constexpr):
        """(channels, keys) tile of k from channel ``start``; a key on the window padding is the bias alone
        (a zero token's qkv)."""
        k = tl.load(base + kv_off[None, :] + (start + offs_c[:, None]) * s_c, mask=in_c[:, None] & k_in[None, :],
                    other=0.0)
        if HAS_BIAS:
            k += tl.where(k_in[None, :], 0.0, bias[:, None]).to(k.dtype)
        return k

    @triton.jit
    def _values(base, kv_off, k_in, bias, start, s_c, offs_c, in_c, HAS_BIAS: tl.constexpr):
        """(keys, channels) tile of v from channel ``start``, padding keys as in :func:`_keys`."""
        v = tl.load(base + kv_off[:, None] + (start + offs_c[None, :]) * s_c, mask=k_in[:, None] & in_c[None, :],
                    other=0.0)
        if HAS_BIAS:
            v += tl.where(k_in[:, None], 0.0, bias[None, :]).to(v.dtype)
        return v

    def _configs() -> list[triton.Config]:
        if _relpos._INTERPRET:  # the interpreter is slow: one small config; two key rows a step, so odd
            return [triton.Config({"BLOCK_M": 16, "KR": 2}, num_warps=1, num_stages=1)]  # windows end short
        # 196 queries of a 14-wide window in 4 × 64 or 2 × 128 (64 rows is the smallest Hopper wgmma tile).
        # KR key rows a step: one row makes 16-key dots (k = 16 for p·v); two or four give the tensor cores
        # longer ones, four wasting two rows' slots on the last step of a 14-row window. The set is the
        # winners of a search over fifteen tiles on an H200 (bench/relpos_kernel.py --extra-window-configs,
        # 2026-11-27 23:40): ViT-H's 16 × 80 heads ran 0.70 ms a block at (128, 2, 8 warps, 3 stages)
        # against 0.82 at the old pick, ViT-B's 12 × 64 0.36 at (64, 2, 4 warps) against 0.48; 8 warps at
        # 64 rows and 32-row tiles lost everywhere, so they are gone (fewer tiles, shorter autotuning).
        # ViT-B's old pick (64, 1, 4 warps, 2 stages) stays in the list: the bench's median with the new pick
        # was worse than with it (0.66 against 0.52 ms) though the autotuner timed the new one faster. Until
        # a retiming explains that, the old pick stays a candidate the autotuner can return to.
        return [triton.Config({"BLOCK_M": bm, "KR": kr}, num_warps=w, num_stages=st)
                for bm, kr, w, st in ((64, 2, 4, 2), (64, 4, 4, 2), (64, 1, 4, 3), (64, 1, 4, 2),
                                      (128, 2, 8, 3), (128, 2, 8, 2))]

    # C (heads × D) is in the key: ViT-B and ViT-L share D = 64 but not their head count, so not their grid.
    @triton.autotune(configs=_configs(), key=["HS", "WS", "WIN", "D", "C", "GATHER"])
    @triton.jit
    def _window_attention_kernel(
        QKV, BQKV, TH, TW, Out,
        s_b, s_y, s_x, s_c,
        st_h, st_hd, st_w, st_wd,
        so_b, so_y, so_x, so_c,
        HS, WS, NWY, NWX, C, D, WIN, qk_scale,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, KR: tl.constexpr, BLOCK_W: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D2: tl.constexpr,
        GATHER: tl.constexpr,
    ):
        BLOCK_N: tl.constexpr = KR * BLOCK_W
        pid_m, n = tl.program_id(0), tl.program_id(1)
        b, wy, wx, qr, qc, yq, xq, q_in = _window_queries(pid_m, tl.program_id(2), NWY, NWX, HS, WS, WIN, BLOCK_M)
        log2e = 1.4426950408889634  # scores in log2 units, so the exponentials are exp2
        qk_scale2 = tl.cast(qk_scale, tl.float32) * log2e  # torch.compile passes a Python float as fp64

        offs_n = tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        in_t = offs_t < 2 * WIN - 1
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        base = QKV + b * s_b

        q, rh, rw = _query_terms(base, TH, TW, yq, xq, q_in, s_y, s_x, s_c, st_h, st_hd, st_w, st_wd, n, D,
                                 offs_d, in_d, offs_t, in_t)
        bk = _qkv_bias(BQKV, C + n * D, offs_d, in_d, HAS_BIAS)
        bv = _qkv_bias(BQKV, 2 * C + n * D, offs_d, in_d, HAS_BIAS)
        if SPLIT_D:  # channels BLOCK_D… of a head that is not a power of two (ViT-H: 80 = 64 + 16)
            offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)
            in_e = offs_e < D
            q2, rh2, rw2 = _query_terms(base, TH, TW, yq, xq, q_in, s_y, s_x, s_c, st_h, st_hd, st_w, st_wd, n, D,
                                        offs_e, in_e, offs_t, in_t)
            rh += rh2
            rw += rw2
            bk2 = _qkv_bias(BQKV, C + n * D, offs_e, in_e, HAS_BIAS)
            bv2 = _qkv_bias(BQKV, 2 * C + n * D, offs_e, in_e, HAS_BIAS)
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

        # A key tile is KR rows of the window, each in BLOCK_W slots (BLOCK_W ≥ WIN, a power of two).
        row_in_tile, kc = offs_n // BLOCK_W, offs_n % BLOCK_W
        # rel_w[q, key column c] = rw[q, qc − c + WIN − 1]: the same for every key row, so built once.
        if GATHER:  # slots that hold no key read a clamped offset; their scores become −inf below
            bw = tl.gather(rw, _offset_index(qc, kc, WIN, BLOCK_T), 1) * log2e
        else:
            bw = _pick_terms(rw, qc, offs_t, kc, WIN, BLOCK_M, BLOCK_N) * log2e

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for r0 in range(0, WIN, KR):  # KR key rows of the window per step
            kr = r0 + row_in_tile
            is_key = (kc < WIN) & (kr < WIN)  # slots past a row's end or the window's last row hold no key
            yk = wy * WIN + kr
            xk = wx * WIN + kc
            k_in = is_key & (xk < WS) & (yk < HS)  # keys on the padding are the bias (a zero token's qkv)
            kv_off = yk * s_y + xk * s_x
            k = _keys(base, kv_off, k_in, bk, C + n * D, s_c, offs_d, in_d, HAS_BIAS)
            v = _values(base, kv_off, k_in, bv, 2 * C + n * D, s_c, offs_d, in_d, HAS_BIAS)
            s = tl.dot(q, k)
            if SPLIT_D:
                k2 = _keys(base, kv_off, k_in, bk2, C + n * D, s_c, offs_e, in_e, HAS_BIAS)
                v2 = _values(base, kv_off, k_in, bv2, 2 * C + n * D, s_c, offs_e, in_e, HAS_BIAS)
                s += tl.dot(q2, k2)
            # rel_h[q, key row] = rh[q, qr − row + WIN − 1]
            if GATHER:
                bh = tl.gather(rh, _offset_index(qr, kr, WIN, BLOCK_T), 1)
            else:
                bh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(KR):
                    val = tl.sum(tl.where(offs_t[None, :] == (qr - r0 - j + WIN - 1)[:, None], rh, 0.0), 1)
                    bh = tl.where(row_in_tile[None, :] == j, val[:, None], bh)
            s = s * qk_scale2 + bh * log2e + bw
            s = tl.where(is_key[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if SPLIT_D:
                acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
            m_i = m_new
        out_row = Out + b * so_b + yq[:, None] * so_y + xq[:, None] * so_x
        acc = acc / l_i[:, None]
        tl.store(out_row + (n * D + offs_d[None, :]) * so_c, acc.to(Out.dtype.element_ty),
                 mask=q_in[:, None] & in_d[None, :])
        if SPLIT_D:
            acc2 = acc2 / l_i[:, None]
            tl.store(out_row + (n * D + offs_e[None, :]) * so_c, acc2.to(Out.dtype.element_ty),
                     mask=q_in[:, None] & in_e[None, :])


def _launch(wrap: Callable[[object], object], qkv: torch.Tensor, bias: torch.Tensor | None,
            table_h: torch.Tensor, table_w: torch.Tensor, window: int, num_heads: int, scale: float) -> torch.Tensor:
    """Allocate the (B, H, W, C) output and launch the kernel (``wrap`` is identity, or ``wrap_triton`` for
    compile)."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    out = qkv.new_empty(B, H, W, C)
    nwy, nwx = -(-H // window), -(-W // window)
    block_d, block_d2 = _relpos.head_blocks(D)

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(window * window, meta["BLOCK_M"]), num_heads, B * nwy * nwx)

    wrap(_window_attention_kernel)[grid](  # type: ignore[index]
        qkv, qkv if bias is None else bias, table_h, table_w, out,
        *qkv.stride(), *table_h.stride(), *table_w.stride(), *out.stride(),
        H, W, nwy, nwx, C, D, window, scale, HAS_BIAS=bias is not None, BLOCK_T=_relpos._pow2(2 * window - 1),
        BLOCK_D=block_d, SPLIT_D=block_d2 > 0, BLOCK_D2=max(block_d2, 16), BLOCK_W=_relpos._pow2(window),
        GATHER=TERMS == "gather",
    )
    return out


def _identity(kernel: object) -> object:
    return kernel


_window_op: Callable[..., torch.Tensor] | None = None


def register_op() -> Callable[..., torch.Tensor] | None:
    """Register the kernel as the torch op ``segany::window_attention`` (once) and return it; None without
    Triton or on torch < 2.6. Deferred from import for the reason given in
    :func:`segany.kernels.relpos_attention.register_op`; ``FastWindowBlock`` calls it when built fused."""
    global _window_op
    if _window_op is not None or triton is None:
        return _window_op
    if not _relpos._INTERPRET and hasattr(torch.library, "triton_op"):
        # Registered so torch.compile keeps the launch inside its graph; see relpos_attention for the pattern.
        @torch.library.triton_op("segany::window_attention", mutates_args=())
        def op(qkv: torch.Tensor, bias: torch.Tensor | None, table_h: torch.Tensor, table_w: torch.Tensor,
               window: int, num_heads: int, scale: float) -> torch.Tensor:
            return _launch(torch.library.wrap_triton, qkv, bias, table_h, table_w,
                           window, num_heads, scale)
    elif hasattr(torch.library, "custom_op"):
        @torch.library.custom_op("segany::window_attention", mutates_args=())
        def op(qkv: torch.Tensor, bias: torch.Tensor | None, table_h: torch.Tensor, table_w: torch.Tensor,
               window: int, num_heads: int, scale: float) -> torch.Tensor:
            return _launch(_identity, qkv, bias, table_h, table_w, window, num_heads, scale)

        @op.register_fake
        def _(qkv: torch.Tensor, bias: torch.Tensor | None, table_h: torch.Tensor, table_w: torch.Tensor,
              window: int, num_heads: int, scale: float) -> torch.Tensor:
            B, H, W, C3 = qkv.shape
            return qkv.new_empty(B, H, W, C3 // 3)
    else:  # pragma: no cover - torch < 2.6
        return None
    _window_op = op
    return op


def window_attention(qkv: torch.Tensor, bias: torch.Tensor | None, table_h: torch.Tensor, table_w: torch.Tensor,
                     window: int, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Windowed multi-head attention with decomposed rel-pos bias, from the projection to token order.

    ``qkv`` (B, H, W, 3C) is the output of the block's ``qkv`` layer *with* its bias; ``bias`` (3C,) is
    that bias again (the value of a padding token; None if the layer has none). ``table_h``/``table_w``
    are (2·window − 1, D) offset tables (:func:`offset_table`). Returns (B, H, W, C) before ``proj``.
    """
    if triton is None:
        raise RuntimeError("the fused window attention needs Triton (it ships with CUDA builds of torch)")
    B, H, W, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"window_attention: {C3} projected channels do not split into q, k, v of {num_heads} heads")
    D = C3 // 3 // num_heads
    if not supports(window, D):
        raise ValueError(f"window_attention: window {window} and head size {D} are not supported")
    rows = 2 * window - 1
    if table_h.shape != (rows, D) or table_w.shape != (rows, D):
        raise ValueError(f"window_attention: offset tables must be ({rows}, {D}), got "
                         f"{tuple(table_h.shape)} and {tuple(table_w.shape)}")
    if bias is not None and bias.shape != (C3,):
        raise ValueError(f"window_attention: bias must have {C3} values, got {tuple(bias.shape)}")
    if TERMS not in _TERMS:
        raise InputError(f"window_attention: rel-pos terms {TERMS!r} are not known; set SEGANY_WINDOW_TERMS to "
                         f"{' or '.join(_TERMS)}, or unset it for the default ({_TERMS[0]})")
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"window_attention: scale must be finite, got {scale}")
    table_h, table_w = table_h.to(qkv.dtype), table_w.to(qkv.dtype)
    bias = None if bias is None else bias.to(qkv.dtype)
    op = _window_op if _window_op is not None else register_op()
    if op is None:  # pragma: no cover - torch < 2.6
        return _launch(_identity, qkv, bias, table_h, table_w, window, num_heads, scale)
    return op(qkv, bias, table_h, table_w, window, num_heads, scale)
