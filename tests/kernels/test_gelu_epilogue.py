"""The ViT MLP with GELU in the first GEMM's epilogue (segany.kernels.gelu_epilogue).

On CPU ``torch._addmm_activation`` computes the exact GELU, so these tests check the swap, the shapes and
that Inductor keeps the call whole; the GPU test checks the tanh form's accuracy where cuBLASLt runs it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config
from torch import nn

from segany.errors import InputError
from segany.fast import FastPath, make_fast_encoder
from segany.kernels.gelu_epilogue import GeluEpilogueMLP, convert_mlps
from segany.modeling import image_encoder as vit
from segany.modeling.config import SamConfig, TinyViTConfig
from segany.modeling.layers import MLP, MLPBlock
from segany.modeling.sam import Sam


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_epilogue_mlp_computes_the_block_it_replaces():
    torch.manual_seed(0)
    block = MLPBlock(32, 128)
    fused = GeluEpilogueMLP(block)
    assert fused.state_dict().keys() == block.state_dict().keys()  # checkpoints load into either
    x = torch.randn(2, 5, 7, 32)  # (B, H, W, C) as the ViT blocks pass it
    with torch.no_grad():
        out, ref = fused(x), block(x)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_only_biased_exact_gelu_mlp_blocks_are_converted():
    root = nn.ModuleDict({
        "exact": MLPBlock(8, 16),
        "relu": MLPBlock(8, 16, act=nn.ReLU),
        "tanh": MLPBlock(8, 16, act=lambda: nn.GELU(approximate="tanh")),
        "head": MLP(8, 16, 4, 3),
        "nested": nn.Sequential(MLPBlock(8, 16)),
    })
    root["nobias"] = MLPBlock(8, 16)
    root["nobias"].lin1 = nn.Linear(8, 16, bias=False)
    assert convert_mlps(root) == 2
    assert isinstance(root["exact"], GeluEpilogueMLP) and isinstance(root["nested"][0], GeluEpilogueMLP)
    for name in ("relu", "tanh", "head", "nobias"):
        assert not isinstance(root[name], GeluEpilogueMLP), name


def test_fast_encoder_swaps_every_block_mlp_and_agrees(tiny_sam):
    enc = make_fast_encoder(tiny_sam.image_encoder, torch.float32, attention="mask", gelu_epilogue=True)
    blocks = [m for m in enc.modules() if isinstance(m, vit.Block)]
    assert len(blocks) == 2 and all(isinstance(b.mlp, GeluEpilogueMLP) for b in blocks)
    assert not any(isinstance(m, GeluEpilogueMLP) for m in tiny_sam.image_encoder.modules())  # a copy
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel_err(enc(x), tiny_sam.image_encoder(x)) < 1e-5


def test_fast_path_takes_the_option_and_refuses_what_it_cannot_do(tiny_sam):
    fast = FastPath(tiny_sam, precision="bf16", attention="mask", gelu_epilogue=True)
    assert fast.gelu_epilogue and all(isinstance(b.mlp, GeluEpilogueMLP) for b in fast.encoder.modules()
                                      if isinstance(b, vit.Block))
    assert not FastPath(tiny_sam, precision="bf16", attention="mask").gelu_epilogue  # CPU default: off
    with pytest.raises(InputError, match="needs precision 'bf16' or 'fp16'"):
        FastPath(tiny_sam, precision="fp32", gelu_epilogue=True)
    with pytest.raises(InputError, match="cannot be combined"):
        make_fast_encoder(tiny_sam.image_encoder, torch.bfloat16, quantize="int8", gelu_epilogue=True)
    light = Sam(SamConfig(encoder=TinyViTConfig(img_size=256, num_classes=0))).eval()
    with pytest.raises(InputError, match="has no ViT block MLP"):
        make_fast_encoder(light.image_encoder, torch.bfloat16, gelu_epilogue=True)


def test_default_is_on_for_reduced_precision_vits_on_cuda_only():
    """Timed on an H200 (2026-11-27: ViT-B +8%, ViT-L +5%, ViT-H +6% img/s, mask IoU unchanged), so a CUDA
    bf16/fp16 ViT gets it by default; the exact fp32 path, the CPU, 8-bit GEMMs and TinyViT do not."""
    from segany.kernels.gelu_epilogue import default_on

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_on(cuda, torch.bfloat16, vit=True, quantized=False)
    assert default_on(cuda, torch.float16, vit=True, quantized=False)
    assert not default_on(cuda, torch.float32, vit=True, quantized=False)
    assert not default_on(cpu, torch.bfloat16, vit=True, quantized=False)
    assert not default_on(cuda, torch.bfloat16, vit=True, quantized=True)
    assert not default_on(cuda, torch.bfloat16, vit=False, quantized=False)


def test_inductor_keeps_the_epilogue_as_one_extern_call():
    """The speed comes from GEMM + bias + GELU being one cuBLASLt call; if Inductor decomposed it back into
    addmm and a GELU kernel, the option would cost the same pass it exists to remove."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    mlp = GeluEpilogueMLP(MLPBlock(16, 64)).eval()
    x = torch.randn(2, 4, 4, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(mlp), x)
        ref = mlp(x)
    torch._dynamo.reset()
    code = "\n".join(codes)
    assert "aten._addmm_activation.default(" in code and "use_gelu=True" in code
    assert "gelu" not in code.replace("use_gelu", "").lower()  # no separate GELU kernel
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_epilogue_encoder_is_within_bf16_error(compiled):
    """cuBLASLt's epilogue is GELU's tanh form: the encoder's error against fp32 must stay that of bf16."""
    model = randomize_(Sam(tiny_config())).eval().cuda()
    x = torch.randn(2, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        ref = model.image_encoder(x)
    plain = FastPath(model, precision="bf16", attention="fused", compile=compiled, gelu_epilogue=False)
    fused = FastPath(model, precision="bf16", attention="fused", compile=compiled, gelu_epilogue=True)
    plain_err, fused_err = _rel_err(plain.encode(x), ref), _rel_err(fused.encode(x), ref)
    assert plain_err < 0.02 and fused_err < 1.25 * plain_err + 1e-3, (plain_err, fused_err)
