"""The fused window-attention kernel (segany.kernels.window_attention) against the reference windowed block.

As for the global kernel (test_relpos_attention.py), CI runs it under Triton's interpreter in a
subprocess, in fp32 (to rounding) and fp16 (the interpreter's bf16 dots are wrong; the CUDA test in
tests/test_fast.py covers bf16). The reference is :class:`segany.modeling.image_encoder.Block` in fp64:
pad to whole windows, partition, attention with the decomposed bias, merge, crop.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_run import register, run_interpreted

from segany.errors import InputError
from segany.kernels import window_attention as wk

pytest.importorskip("triton")

SCRIPT = register(textwrap.dedent(
    """
    import json, torch
    from segany.fast import FastViTAttention, FastWindowBlock, make_fast_encoder
    from segany.kernels import window_attention as wk
    from segany.modeling import image_encoder as vit
    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam

    g = torch.Generator().manual_seed(0)
    calls = []
    real = wk.window_attention
    wk.window_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    out = {"available_cpu": wk.available("cpu")}
    # (dim, heads, window, H, W, dtype, qkv_bias, table rows): grids that are and are not whole windows,
    # head sizes of 16, 20 (one padded tile) and 80 (ViT-H: 64 + 16), no qkv bias, and a rel-pos table
    # trained for another size (resampled, as a checkpoint run at another resolution is).
    cases = [(32, 2, 4, 8, 8, torch.float32, True, None), (40, 2, 4, 7, 9, torch.float32, True, None),
             (160, 2, 5, 11, 6, torch.float32, True, None), (48, 3, 3, 5, 7, torch.float32, False, None),
             (32, 2, 4, 6, 5, torch.float32, True, 11), (64, 2, 4, 6, 10, torch.float16, True, None),
             (160, 2, 3, 4, 5, torch.float16, True, None)]
    def run_cases(cases):
        done = []
        for dim, nh, win, H, W, dt, qkv_bias, rows in cases:
            blk = vit.Block(ViTConfig(embed_dim=dim, num_heads=nh, qkv_bias=qkv_bias), window=win)
            if rows is not None:
                hd = dim // nh
                blk.attn.rel_pos_h = torch.nn.Parameter(torch.zeros(rows, hd))
                blk.attn.rel_pos_w = torch.nn.Parameter(torch.zeros(rows, hd))
            with torch.no_grad():
                for p in blk.parameters():
                    p.normal_(0, 0.1, generator=g)
            blk.eval()
            fast = FastWindowBlock.from_block(blk, FastViTAttention.from_attention(blk.attn, "fold"), fused=True)
            # Batch 2 in the first case only: windows of the batch are one axis to the kernel, so 1 covers the rest.
            x = torch.randn(2 if (dim, H, W) == (32, 8, 8) else 1, H, W, dim, generator=g)
            before = len(calls)
            with torch.no_grad():
                ref = blk.double()(x.double())
                got = fast.to(dt)(x.to(dt))
            delta = (ref - x.double()).abs().max()  # the block's own contribution, not the residual
            done.append({"shape": [dim, nh, win, H, W], "dtype": str(dt),
                         "ran": len(calls) - before,
                         "out_shape": list(got.shape), "finite": bool(torch.isfinite(got).all()),
                         "err": float((got.double() - ref).abs().max() / delta)})
        return done

    out["cases"] = run_cases(cases)
    # The experimental "gather" reading of the rel-pos terms (wk.TERMS) on the shapes that differ for it:
    # a partial last window, an 80-channel head in two tiles, a resampled table, and fp16.
    wk.TERMS = "gather"
    out["gather_cases"] = run_cases([cases[1], cases[2], cases[4], cases[6]])
    wk.TERMS = "select"

    # The whole encoder with attention="fused": the window kernel in the windowed block.
    torch.manual_seed(0)
    sam = Sam(SamConfig(encoder=ViTConfig(img_size=160, depth=2, embed_dim=64, num_heads=2,
                                          global_attn_indexes=(1,), window_size=4))).eval()
    with torch.no_grad():
        for p in sam.image_encoder.parameters():
            p.normal_(0, 0.05, generator=g)
    fast = make_fast_encoder(sam.image_encoder, torch.float32, attention="fused")
    x = torch.randn(1, 3, 160, 160, generator=g)  # a 10×10 grid: windows of 4 pad it to 12×12
    before = len(calls)
    with torch.no_grad():
        a, b = fast(x), sam.image_encoder(x)
    out["encoder_calls"] = len(calls) - before
    out["encoder_err"] = float((a - b).abs().max() / b.abs().max())

    wk.window_attention = real
    from interpreter_run import compiled_graph_report
    report = compiled_graph_report(fast, x, b, "window_attention")
    out["compiled_graphs"], out["compiled_window_ops"], out["compiled_err"] = report["graphs"], report["op_calls"], report["err"]
    print(json.dumps(out))
    """
))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(SCRIPT)


def test_window_kernel_matches_the_reference_block(interpreted):
    assert interpreted["available_cpu"] is True
    cases = interpreted["cases"]
    assert len(cases) == 7
    for case in cases:
        dim, nh, win, H, W = case["shape"]
        assert case["ran"] == 1 and case["out_shape"][1:] == [H, W, dim] and case["finite"], case
        tol = 1e-5 if case["dtype"] == "torch.float32" else 5e-3  # fp16 rounds p before p·v
        assert case["err"] < tol, case


def test_gather_terms_match_the_reference_block(interpreted):
    """``TERMS = "gather"`` reads the same rel-pos terms by ``tl.gather``: the same answers to rounding."""
    cases = interpreted["gather_cases"]
    assert len(cases) == 4
    for case, select in zip(cases, [interpreted["cases"][i] for i in (1, 2, 4, 6)], strict=True):
        assert case["shape"] == select["shape"] and case["ran"] == 1 and case["finite"], case
        tol = 1e-5 if case["dtype"] == "torch.float32" else 5e-3
        assert case["err"] < tol, case


def test_unknown_terms_setting_is_refused(monkeypatch):
    if wk.triton is None:
        pytest.skip("needs Triton")
    monkeypatch.setattr(wk, "TERMS", "gathr")
    with pytest.raises(InputError, match=r"'gathr' are not known; set SEGANY_WINDOW_TERMS to select or gather"):
        wk.window_attention(torch.zeros(1, 4, 4, 24), None, torch.zeros(7, 4), torch.zeros(7, 4), 4, 2)


def test_fused_encoder_runs_the_window_kernel_and_matches(interpreted):
    assert interpreted["encoder_calls"] == 1  # the one windowed block
    assert interpreted["encoder_err"] < 1e-5


def test_fused_encoder_compiles_to_one_graph_with_both_ops(interpreted):
    assert interpreted["compiled_graphs"] == 1
    assert interpreted["compiled_window_ops"] == 1, "the kernel must appear in the graph as segany::window_attention"
    assert interpreted["compiled_err"] < 1e-5


def test_offset_table_holds_each_offset_once():
    """The reference's per-pair table reads offset ``i − j + w − 1``; offset_table must give those rows back."""
    from segany.modeling.image_encoder import relative_position_table

    rel_pos = torch.randn(2 * 5 - 1, 8)
    assert torch.equal(wk.offset_table(relative_position_table(5, 5, rel_pos)), rel_pos)


def test_window_kernel_supported_shapes():
    assert wk.supports(14, 80) and wk.supports(32, 128)
    assert not wk.supports(33, 64) and not wk.supports(14, 160) and not wk.supports(0, 64)


def test_window_kernel_checks_arguments_before_launching():
    if wk.triton is None:
        pytest.skip("needs Triton")
    qkv = torch.zeros(1, 4, 4, 3 * 8)
    with pytest.raises(ValueError, match="do not split"):
        wk.window_attention(qkv, None, torch.zeros(7, 4), torch.zeros(7, 4), 4, 3)
    with pytest.raises(ValueError, match=r"offset tables must be \(7, 4\)"):
        wk.window_attention(qkv, None, torch.zeros(5, 4), torch.zeros(7, 4), 4, 2)
    with pytest.raises(ValueError, match="bias must have 24 values"):
        wk.window_attention(qkv, torch.zeros(8), torch.zeros(7, 4), torch.zeros(7, 4), 4, 2)
    with pytest.raises(ValueError, match="not supported"):
        wk.window_attention(qkv, None, torch.zeros(7, 4), torch.zeros(7, 4), 40, 2)
