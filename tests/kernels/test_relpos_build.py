"""The fused rel-pos kernels (global and windowed) build for the GPUs they are chosen on, with the argument
types torch.compile gives them.

CI has no GPU, but Triton compiles a kernel to a cubin without one. This matters because the interpreter
tests (test_relpos_attention.py) never see the real compiler's typing: on an H200 (2026-11-26) every
compiled encoder with ``attention="fused"`` failed, because Inductor types a Python float argument as fp64
(``torch/_inductor/codegen/triton_utils.py``, ``signature_of``) where Triton's own launcher uses fp32, and
the fp64 scale turned the loop-carried softmax state fp64. Both typings are built here, for each head
layout the encoders use (one 64-channel tile; ViT-H's 80 channels as 64 + 16) and both half types.
"""

from __future__ import annotations

import functools

import pytest

triton = pytest.importorskip("triton")

from segany.kernels import relpos_attention as relpos  # noqa: E402

POINTERS = ("Q", "K", "V", "BH", "BW", "Out")
CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "SPLIT_D", "BLOCK_D2", "KR")


@functools.cache  # the fp32 build at 80 channels is shared by two tests
def _build(scale_type: str, head_dim: int, half: str, block_m: int = 64, arch: int = 90, rows: int = 1) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = relpos._relpos_attention_kernel.fn  # the JITFunction under the autotuner
    names = list(fn.arg_names)
    assert {"qk_scale", *POINTERS, *CONSTEXPRS} <= set(names), names
    signature = {n: (f"*{half}" if n in POINTERS else scale_type if n == "qk_scale"
                     else "constexpr" if n in CONSTEXPRS else "i32") for n in names}
    block_d, block_d2 = relpos.head_blocks(head_dim)
    values = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": block_d, "SPLIT_D": block_d2 > 0,
              "BLOCK_D2": max(block_d2, 16), "KR": rows}
    constexprs = {(names.index(n),): v for n, v in values.items()}
    options = {"num_warps": 8} if rows > 1 else {}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def _nvidia_backend() -> bool:
    from triton.backends import backends

    return "nvidia" in backends


# torch.compile's typing of the scale (fp64) for each head layout and half type; Triton's launcher's (fp32)
# once, at ViT-H's split head: the typing and the layout are independent, so the cross product adds nothing.
TYPINGS = [("fp64", 64, "bf16"), ("fp64", 80, "bf16"), ("fp64", 64, "fp16"), ("fp32", 80, "bf16")]


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
@pytest.mark.parametrize(("scale_type", "head_dim", "half"), TYPINGS)
def test_kernel_builds_for_sm90(scale_type, head_dim, half):
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    kernel = _build(scale_type, head_dim, half)
    assert kernel.asm.get("cubin"), "no cubin was produced"


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_builds_two_key_rows_a_step(arch):
    """The autotuner's two-rows-a-step tiles (128 queries, 8 warps) at ViT-H's heads, as torch.compile types them."""
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    kernel = _build("fp64", 80, "bf16", block_m=128, arch=arch, rows=2)
    assert kernel.asm.get("cubin") and (arch != 90 or "wgmma" in kernel.asm["ptx"])


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
@pytest.mark.parametrize("head_dim", [64, 80])
def test_kernel_builds_for_sm80_and_sm89(head_dim):
    """``attention="auto"`` picks the kernel on every GPU of compute capability 8.0+ (A100, L4/L40/4090),
    with the larger of its tile configurations too."""
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    # sm80 stands for 8.x: Ada (8.9) gets the same mma.sync code for bf16; building both doubled CI's time here.
    assert _build("fp32", head_dim, "bf16", block_m=128, arch=80).asm.get("cubin")


WINDOW_POINTERS = ("QKV", "BQKV", "TH", "TW", "Out")
WINDOW_CONSTEXPRS = ("HAS_BIAS", "BLOCK_M", "BLOCK_T", "BLOCK_D", "SPLIT_D", "BLOCK_D2", "GATHER")
FLASH_CONSTEXPRS = ("KR", "BLOCK_W")


@functools.cache  # the default build is shared by two tests
def _build_window(scale_type: str, head_dim: int, half: str, block_m: int = 64, rows: int = 2,
                  num_warps: int = 4, arch: int = 90, num_stages: int = 2, gather: bool = False) -> object:
    """The kernel of segany.kernels.window_attention at SAM's 14-token windows."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from segany.kernels import window_attention as wk

    fn = wk._window_attention_kernel.fn
    names = list(fn.arg_names)
    own = FLASH_CONSTEXPRS
    assert {"qk_scale", *WINDOW_POINTERS, *WINDOW_CONSTEXPRS, *own} <= set(names), names
    signature = {n: (f"*{half}" if n in WINDOW_POINTERS else scale_type if n == "qk_scale"
                     else "constexpr" if n in WINDOW_CONSTEXPRS + own else "i32") for n in names}
    block_d, block_d2 = relpos.head_blocks(head_dim)
    values = {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_T": 32, "BLOCK_D": block_d,
              "SPLIT_D": block_d2 > 0, "BLOCK_D2": max(block_d2, 16),
              "KR": rows, "BLOCK_W": 16, "GATHER": gather}
    constexprs = {(names.index(n),): v for n, v in values.items()}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
@pytest.mark.parametrize(("scale_type", "head_dim", "half"), TYPINGS)
def test_window_kernel_builds_for_sm90(scale_type, head_dim, half):
    """Hopper tensor-core dots (wgmma) for the 64-query tiles the autotuner is likeliest to pick."""
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    kernel = _build_window(scale_type, head_dim, half)
    assert kernel.asm.get("cubin") and "wgmma" in kernel.asm["ptx"]


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
@pytest.mark.parametrize(("block_m", "rows", "num_warps", "num_stages"),
                         [(64, 2, 4, 2), (64, 4, 4, 2), (64, 1, 4, 3), (64, 1, 4, 2), (128, 2, 8, 3),
                          (128, 2, 8, 2)])
def test_window_kernel_builds_every_tile_for_sm80_and_sm89(block_m, rows, num_warps, num_stages):
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    kernel = _build_window("fp32", 80, "bf16", block_m=block_m, rows=rows, num_warps=num_warps, arch=80,
                           num_stages=num_stages)
    assert kernel.asm.get("cubin")  # sm80 stands for 8.x, as above


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
@pytest.mark.parametrize(("head_dim", "arch", "block_m", "rows", "num_warps"),
                         [(80, 90, 128, 2, 8), (64, 90, 64, 2, 4), (80, 80, 64, 4, 4)])
def test_window_kernel_builds_with_gathered_terms(head_dim, arch, block_m, rows, num_warps):
    """``TERMS = "gather"`` (tl.gather of the rel-pos terms) at the shipped tiles, as torch.compile types it."""
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    kernel = _build_window("fp64", head_dim, "bf16", block_m=block_m, rows=rows, num_warps=num_warps,
                           arch=arch, gather=True)
    assert kernel.asm.get("cubin") and (arch != 90 or "wgmma" in kernel.asm["ptx"])


@pytest.mark.skipif(relpos.triton is None, reason="needs Triton")
def test_batch_offsets_are_64_bit():
    """Each tensor's batch offset (b · batch stride) is added to its pointer in 64 bits: in 32 it wraps from
    2³¹ elements, 137 ViT-H images in one windowed call, and the kernel would read another image's memory."""
    import re

    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend here")
    for ttir, pointers in ((_build("fp32", 80, "bf16").asm["ttir"], ("Q", "K", "V", "BH", "BW", "Out")),
                           (_build_window("fp32", 80, "bf16").asm["ttir"], ("QKV", "Out"))):
        for name in pointers:
            assert re.search(rf"tt\.addptr %{name}, %\S+ : !tt\.ptr<bf16>, i64", ttir), (name, ttir[:2000])
