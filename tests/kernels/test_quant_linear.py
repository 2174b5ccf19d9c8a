"""8-bit GEMMs for the encoder blocks (int8 and fp8): scaling, the layer against a dequantised fp32
product, and the fast path built with them.

``torch._int_mm`` and ``torch._scaled_mm`` run on CPU too, so these check the same calls a GPU makes;
only speed needs a GPU (bench/speed.py --quantize-gpu).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_
from torch import nn

from segany.errors import InputError
from segany.fast import FastPath, FastWindowBlock, make_fast_encoder
from segany.kernels.quant_linear import QuantLinear, convert_linears, quantize_rows
from segany.modeling.config import SamConfig, TinyViTConfig, ViTConfig
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor

QMAX = {"int8": 127.0, "fp8": 448.0}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# Relative error of a whole 8-bit encoder vs fp32 on the test model (measured: int8 ~0.01, fp8 ~0.025).
QUANT_REL_TOL = {"int8": 0.03, "fp8": 0.08}


def _rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_rows_scales_each_row_to_its_own_maximum(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    x[1] *= 1000.0  # an outlier row must not coarsen the others
    x[3] = 0.0  # an all-zero row keeps a finite scale
    q, s = quantize_rows(x, fmt)
    assert q.dtype == QDTYPE[fmt] and s.shape == (5, 1) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and (q[3].float() == 0).all()
    back = q.float() * s
    for r in (0, 1, 2, 4):
        row, amax = x[r], x[r].abs().max()
        assert back[r].abs().max() == pytest.approx(amax.item(), rel=1e-6)  # the row maximum maps exactly
        if fmt == "int8":  # a uniform grid: half a step, amax/254, at most
            assert (back[r] - row).abs().max() <= amax / 254 * (1 + 1e-5)
        else:  # 3 mantissa bits: half an ulp, 1/16 of the value, for normal numbers
            big = row.abs() > amax / 8
            assert ((back[r] - row).abs()[big] <= row.abs()[big] / 16 + 1e-12).all()
    assert q.float().abs().max() == QMAX[fmt]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_is_the_dequantised_product(fmt, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 288, bias=bias)
    q = QuantLinear(layer, fmt, torch.bfloat16)
    assert q.weight_q.dtype == QDTYPE[fmt] and q.weight_scale.shape == (1, 288)
    x = torch.randn(2, 7, 5, 96).bfloat16()
    out = q(x)
    assert out.shape == (2, 7, 5, 288) and out.dtype == torch.bfloat16
    xq, xs = quantize_rows(x.reshape(-1, 96), fmt)
    expect = (xq.float() * xs) @ (q.weight_q.float() * q.weight_scale.t()).t()
    if bias:
        expect = expect + q.bias.float()
    torch.testing.assert_close(out.reshape(-1, 288).float(), expect, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    with torch.no_grad():
        err = _rel_err(out, layer(x.float()))
    assert 2e-3 < err < QUANT_REL_TOL[fmt], err  # 8-bit-sized: above bf16 rounding, far below garbage
    no_bias = out - q.bias if bias else out
    torch.testing.assert_close(q.matmul(x), no_bias, rtol=2e-2, atol=2e-2)


def test_int8_is_the_more_accurate_format():
    """The reason int8 is offered beside fp8: a uniform 8-bit grid beats 3 mantissa bits on a layer's output."""
    torch.manual_seed(1)
    layer = nn.Linear(256, 512)
    x = torch.randn(64, 256).bfloat16()
    with torch.no_grad():
        ref = layer(x.float())
        errs = {fmt: _rel_err(QuantLinear(layer, fmt)(x), ref) for fmt in ("int8", "fp8")}
    assert errs["int8"] < errs["fp8"] / 2, errs


def test_convert_linears_takes_only_aligned_plain_linears():
    root = nn.Sequential(nn.Linear(32, 64), nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 10)),
                         nn.Conv2d(3, 16, 1))
    assert convert_linears(root, "int8") == 2
    assert isinstance(root[0], QuantLinear) and isinstance(root[1][0], QuantLinear)
    assert type(root[1][2]) is nn.Linear  # 10 outputs: not a multiple of 16, kept
    assert type(root[2]) is nn.Conv2d
    with pytest.raises(ValueError, match="format must be one of"):
        QuantLinear(nn.Linear(16, 16), "int4")


def _padded_window_sam() -> Sam:
    """256 px, window 6: the 16×16 token grid pads to 18×18, so the window block's padding path runs.

    Default initialisation, not conftest's small noise: with weights of std 0.05 the blocks add little to
    the residual stream and a quantisation error in them would hardly show at the output.
    """
    cfg = SamConfig(encoder=ViTConfig(img_size=256, depth=2, embed_dim=96, num_heads=3,
                                      global_attn_indexes=(1,), window_size=6))
    torch.manual_seed(0)
    model = Sam(cfg).eval()
    randomize_(model.image_encoder.blocks[1].attn, seed=1)  # non-zero rel-pos tables in the global block
    return model


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_encoder_converts_every_block_gemm_and_stays_close(fmt):
    model = _padded_window_sam()
    fast = FastPath(model, precision="bf16", quantize=fmt, attention="mixed")
    blocks = list(fast.encoder.blocks)
    assert isinstance(blocks[0], FastWindowBlock)
    for block in blocks:
        layers = [block.attn.qkv, block.attn.proj, block.mlp.lin1, block.mlp.lin2]
        assert all(isinstance(m, QuantLinear) and m.fmt == fmt for m in layers)
    assert not any(isinstance(m, QuantLinear) for m in fast.encoder.neck.modules())  # the neck stays bf16
    assert type(model.image_encoder.blocks[0].attn.qkv) is nn.Linear  # the model passed in is untouched
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.image_encoder(x)
    bf16 = FastPath(model, precision="bf16", attention="mixed").encode(x)
    out = fast.encode(x)
    err, err_bf16 = _rel_err(out, ref), _rel_err(bf16, ref)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert 1.2 * err_bf16 < err < QUANT_REL_TOL[fmt], (err, err_bf16)  # quantised, and only 8-bit-sized


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_predictor_masks_agree_with_fp32(sample_image, fmt):
    model = _padded_window_sam()
    exact, quick = SamPredictor(model), SamPredictor(model, precision="bf16", quantize=fmt)
    assert quick.fast is not None and quick.fast.quantize == fmt
    for p in (exact, quick):
        p.set_image(sample_image)
    point, label = np.array([[300, 200]]), np.array([1])
    a = exact.predict(point, label, return_logits=True)[0]
    b = quick.predict(point, label, return_logits=True)[0]
    assert _rel_err(b, a) < QUANT_REL_TOL[fmt]
    clear = np.abs(a) > 0.25 * np.abs(a).max()  # pixels well away from the threshold keep their side
    assert ((a > 0) == (b > 0))[clear].all()


def test_quantize_bad_options_say_what_to_do(tiny_sam):
    with pytest.raises(InputError, match="quantize must be one of"):
        FastPath(tiny_sam, precision="bf16", quantize="int4")
    with pytest.raises(InputError, match="pass precision='bf16'"):
        FastPath(tiny_sam, precision="fp32", quantize="fp8")
    with pytest.raises(InputError, match="pass precision='bf16'"):
        SamPredictor(tiny_sam, quantize="int8")  # CPU auto precision is fp32
    no_linears = nn.Sequential(nn.Conv2d(3, 16, 3))
    with pytest.raises(InputError, match="has no linear layer"):
        make_fast_encoder(no_linears, torch.bfloat16, quantize="int8")


def test_tiny_vit_quantizes_its_attention_block_linears():
    """The light encoder (segany_tiny's) takes quantize too: that is how the 8-bit formats get measured on
    trained weights and real data here (docs/benchmarks.md), since no trained ViT can be fetched."""
    torch.manual_seed(0)
    model = Sam(SamConfig(encoder=TinyViTConfig(img_size=256, num_classes=0))).eval()
    n_linear = sum(type(m) is nn.Linear for m in model.image_encoder.modules())
    enc = make_fast_encoder(model.image_encoder, torch.bfloat16, quantize="int8")
    assert sum(isinstance(m, QuantLinear) for m in enc.modules()) == n_linear > 0
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = model.image_encoder(x)
        bf16_err = _rel_err(make_fast_encoder(model.image_encoder, torch.bfloat16)(x.bfloat16()), ref)
        int8_err = _rel_err(enc(x.bfloat16()), ref)
    # Judged against bf16 alone on the same input: the untrained TinyViT's error depends on the CPU's bf16
    # kernels (0.015 bf16 / 0.031 int8 without AVX512-BF16, less with it), and int8 adds its own on top.
    # A wrong scale or layout gives errors of order 1.
    assert bf16_err < 0.03 and int8_err < bf16_err + QUANT_REL_TOL["int8"]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_encoder_compiles_to_one_graph(tiny_sam, fmt):
    """What a GPU runs for speed is the compiled encoder, so the 8-bit form must trace without graph breaks."""
    import torch._dynamo as dynamo

    enc = make_fast_encoder(tiny_sam.image_encoder, torch.bfloat16, attention="mixed", quantize=fmt)
    x = torch.randn(1, 3, 256, 256).bfloat16()
    explanation = dynamo.explain(enc)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_quantized_encoder(fmt, compiled):
    if torch.cuda.get_device_capability() < ((8, 9) if fmt == "fp8" else (8, 0)):
        pytest.skip(f"{fmt} needs a newer GPU")
    model = _padded_window_sam().cuda()
    x = torch.randn(2, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        ref = model.image_encoder(x)
    fast = FastPath(model, precision="bf16", quantize=fmt, attention="fused", compile=compiled)
    out = fast.encode(x)
    assert _rel_err(out, ref) < QUANT_REL_TOL[fmt]
