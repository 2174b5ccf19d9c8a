"""The fused rel-pos attention kernel (segany.kernels.relpos_attention) against SDPA with the full bias.

CI has no GPU, so the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU) in
a subprocess: the variable must be set before Triton decorates the kernel. The interpreter's ``tl.dot`` is
wrong for bf16 operands (a Triton limitation), so bf16 is covered by the CUDA-only test in
tests/test_fast.py and the kernel is checked here in fp32 (to rounding) and fp16.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_run import register, run_interpreted

from segany.kernels import relpos_attention as relpos

pytest.importorskip("triton")

SCRIPT = register(textwrap.dedent(
    """
    import json, torch
    import torch.nn.functional as F
    from segany.kernels import relpos_attention as relpos

    def reference(q, k, v, bh, bw):
        B, nh, L, H = bh.shape
        bias = (bh[..., :, None] + bw[..., None, :]).reshape(B, nh, L, L)
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())

    g = torch.Generator().manual_seed(0)
    out = {"available_cpu": relpos.available("cpu"),
           "available_cpu_dtypes": [relpos.available("cpu", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]}
    # (B, nh, H, W, D, dtype): powers of two, odd widths and head sizes, L not a multiple of BLOCK_M.
    # 80 and 48 run as two channel tiles (64 + 16, 32 + 16), ViT-H's head size among them.
    cases = [(1, 2, 4, 8, 16, torch.float32), (2, 3, 5, 7, 20, torch.float32), (1, 1, 3, 17, 64, torch.float32),
             (1, 2, 6, 6, 32, torch.float16), (1, 2, 3, 5, 80, torch.float32), (1, 1, 4, 6, 48, torch.float32),
             (1, 2, 4, 4, 80, torch.float16)]

    def run_cases(cases):
        done = []
        for B, nh, H, W, D, dt in cases:
            L = H * W
            # q, k, v as the encoder makes them: strided views of one (B, L, 3, nh, D) projection.
            qkv = torch.randn(B, L, 3, nh, D, generator=g).to(dt).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            bh = torch.randn(B, nh, L, H, generator=g).to(dt)
            bw = torch.randn(B, nh, L, W, generator=g).to(dt)
            got = relpos.relpos_attention(q, k, v, bh, bw, (H, W))
            ref = reference(q, k, v, bh, bw)
            # bias_h transposed (queries contiguous): same values, other strides; the kernel takes any strides.
            bh_t = bh.transpose(-1, -2).contiguous().transpose(-1, -2)
            got_t = relpos.relpos_attention(q, k, v, bh_t, bw, (H, W))
            done.append({"shape": [B, nh, H, W, D], "dtype": str(dt), "out_shape": list(got.shape),
                         "out_dtype": str(got.dtype), "finite": bool(torch.isfinite(got).all()),
                         "err": float((got.double() - ref).abs().max() / ref.abs().max()),
                         "err_transposed_bias": float((got_t.double() - ref).abs().max() / ref.abs().max())})
        return done

    out["cases"] = run_cases(cases)
    # Two key-grid rows a step (a config the GPU autotuner may pick): odd row counts, where the last step
    # runs past the grid, a head in two channel tiles, and fp16.
    import triton
    kernel = relpos._relpos_attention_kernel
    own, kernel.configs = kernel.configs, [triton.Config({"BLOCK_M": 16, "KR": 2}, num_warps=1, num_stages=1)]
    kernel.cache.clear()
    out["two_row_cases"] = run_cases([cases[1], cases[3], cases[4]])
    kernel.configs = own
    kernel.cache.clear()

    # The whole fast encoder with attention="fused" (the kernel in its global block) vs the fp32 reference.
    from segany.fast import make_fast_encoder
    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam
    torch.manual_seed(0)
    sam = Sam(SamConfig(encoder=ViTConfig(img_size=128, depth=2, embed_dim=64, num_heads=2,
                                          global_attn_indexes=(1,), window_size=4))).eval()
    with torch.no_grad():
        for p in sam.image_encoder.parameters():
            p.normal_(0, 0.05, generator=g)
    calls = []
    real = relpos.relpos_attention
    relpos.relpos_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    fast = make_fast_encoder(sam.image_encoder, torch.float32, attention="fused")
    x = torch.randn(1, 3, 128, 128, generator=g)
    with torch.no_grad():
        a, b = fast(x), sam.image_encoder(x)
    out["encoder_err"] = float((a - b).abs().max() / b.abs().max())
    out["kernel_calls"] = len(calls)

    # torch.compile must keep the kernel in one graph (fullgraph=True fails on any graph break); the eager
    # backend then runs the captured graph, so the registered op is what executes.
    relpos.relpos_attention = real
    from interpreter_run import compiled_graph_report
    report = compiled_graph_report(fast, x, b, "relpos_attention")
    out["compiled_graphs"], out["compiled_op_calls"], out["compiled_err"] = report["graphs"], report["op_calls"], report["err"]
    print(json.dumps(out))
    """
))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(SCRIPT)


def test_kernel_matches_sdpa_with_full_bias(interpreted):
    assert interpreted["available_cpu"] is True  # the interpreter runs CPU tensors
    # ...but not bf16 ones: the interpreter's bf16 tl.dot is wrong, and an interpreted bf16 encoder gave garbage.
    assert interpreted["available_cpu_dtypes"] == [True, True, False]
    cases = interpreted["cases"]
    assert len(cases) == 7
    for case in cases:
        B, nh, H, W, D = case["shape"]
        assert case["out_shape"] == [B, nh, H * W, D] and case["finite"], case
        tol = 1e-5 if case["dtype"] == "torch.float32" else 5e-3  # fp16 rounds p before p·v
        assert case["err"] < tol and case["err_transposed_bias"] < tol, case


def test_two_key_rows_a_step_match_sdpa(interpreted):
    cases = interpreted["two_row_cases"]
    assert [c["shape"] for c in cases] == [c["shape"] for c in (interpreted["cases"][i] for i in (1, 3, 4))]
    for case in cases:
        tol = 1e-5 if case["dtype"] == "torch.float32" else 5e-3
        assert case["finite"] and case["err"] < tol and case["err_transposed_bias"] < tol, case


def test_fused_encoder_runs_the_kernel_and_matches(interpreted):
    assert interpreted["kernel_calls"] == 1  # the one global block; the windowed block folds instead
    assert interpreted["encoder_err"] < 1e-5


def test_fused_encoder_compiles_to_one_graph_with_the_op(interpreted):
    assert interpreted["compiled_graphs"] == 1
    assert interpreted["compiled_op_calls"] == 1, "the kernel must appear in the graph as segany::relpos_attention"
    assert interpreted["compiled_err"] < 1e-5


def test_cpu_without_interpreter_falls_back_to_sdpa():
    assert not relpos._INTERPRET and relpos.available("cpu") is False  # this process compiles, never interprets
    assert relpos.supports((64, 64), 64) and relpos.supports((64, 64), 80)
    assert not relpos.supports((16, 256), 64) and not relpos.supports((64, 64), 160)


@pytest.mark.parametrize(("value", "two_rows"), [(None, False), ("0", False), ("true", False), ("1", True)])
def test_two_row_tiles_are_offered_only_when_asked(monkeypatch, value, two_rows):
    if relpos.triton is None:
        pytest.skip("needs Triton")
    if value is None:
        monkeypatch.delenv("SEGANY_RELPOS_TWO_ROWS", raising=False)
    else:
        monkeypatch.setenv("SEGANY_RELPOS_TWO_ROWS", value)
    rows = {c.kwargs["KR"] for c in relpos._configs()}
    assert rows == ({1, 2} if two_rows else {1})


def test_bad_shapes_are_refused():
    q = torch.zeros(1, 1, 12, 8)
    with pytest.raises(ValueError, match="grid"):
        relpos.relpos_attention(q, q, q, torch.zeros(1, 1, 12, 3), torch.zeros(1, 1, 12, 5), (3, 5))


def test_head_channel_tiles():
    assert relpos.head_blocks(64) == (64, 0) and relpos.head_blocks(128) == (128, 0)
    assert relpos.head_blocks(80) == (64, 16)  # ViT-H: exact, instead of one 128-channel tile
    assert relpos.head_blocks(20) == (32, 0) and relpos.head_blocks(112) == (128, 0)  # no gain from splitting


# ViT-B/L heads (64), ViT-H's (80 = 64 + 16) and a 128-wide one.
@pytest.mark.parametrize("block_d,block_d2", [(64, 0), (64, 16), (128, 0)])
def test_kernel_compiles_for_hopper_without_a_gpu(tmp_path, monkeypatch, block_d, block_d2):
    """Lower the bf16 kernel to sm_90 machine code ahead of time: catches Triton compile errors in CI and
    shows the dots became Hopper tensor-core instructions (wgmma), not a slower fallback."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fn = relpos._relpos_attention_kernel.fn  # the jitted function under the autotuner
    sig = {n: ("*bf16" if n in ("Q", "K", "V", "BH", "BW", "Out") else "constexpr"
               if n.startswith(("BLOCK_", "SPLIT_")) or n == "KR" else "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    constexprs = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": block_d, "SPLIT_D": block_d2 > 0,
                  "BLOCK_D2": max(block_d2, 16), "KR": 1}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    assert kernel.asm["cubin"] and "wgmma" in kernel.asm["ptx"]
    assert kernel.metadata.shared <= 227 * 1024  # fits an H100/H200 block's shared memory
