"""The fast path (segany.fast) on CPU: it runs, and agrees with the exact fp32 path within stated tolerances.

bf16 has an 8-bit mantissa (relative rounding ~4e-3 per op), so after a dozen layers we allow a logit
error of 5% of the logit range, and compare thresholded masks by IoU only where logits are clearly
away from the threshold. fp32 variants of the fast modules must agree to 1e-5.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from segany.errors import InputError
from segany.fast import (
    FastMaskDecoder,
    FastPath,
    FastViTAttention,
    FastWindowBlock,
    compile_cache_dir,
    configure_cpu_threads,
    encode_images,
    make_fast_encoder,
    mode_uses_cuda_graphs,
    resolve_precision,
)
from segany.modeling import image_encoder as vit
from segany.modeling.config import SamConfig, ViTConfig
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor

BF16_REL_TOL = 0.05  # max |logit error| / max |logit|


def _as_f64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):  # CUDA tensors too (np.asarray refuses them)
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _rel_err(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = _as_f64(a), _as_f64(b)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


@pytest.fixture
def image() -> np.ndarray:
    return (np.random.RandomState(0).rand(200, 300, 3) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["mask", "fold", "mixed", "fused", "flex"])
def test_fast_attention_fp32_matches_reference(tiny_sam, mode):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    fast = make_fast_encoder(tiny_sam.image_encoder, torch.float32, attention=mode)
    modes = {(b.window > 0, b.attn.mode) for b in fast.modules() if isinstance(b, vit.Block)}
    if mode in ("mixed", "fused"):  # fold where windows keep the head narrow; mask or the kernel in global blocks
        assert modes == {(True, "fold"), (False, "mask" if mode == "mixed" else "fused")}
    else:
        assert modes == {(True, mode), (False, mode)}
    # "fused" windows run their own kernel where Triton can (CUDA); here, without it, they fold.
    assert {b.fused for b in fast.modules() if isinstance(b, FastWindowBlock)} == {mode == "fused"}
    assert not any(isinstance(m, FastViTAttention) for m in tiny_sam.image_encoder.modules()), "original touched"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), tiny_sam.image_encoder(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [256, 250])  # 250: the strided convolution drops the 10-pixel remainder
def test_gemm_patch_embed_matches_the_convolution(tiny_sam, size):
    from segany.fast import _GemmPatchEmbed

    src = tiny_sam.image_encoder.patch_embed
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    fast = make_fast_encoder(tiny_sam.image_encoder, torch.bfloat16)
    assert isinstance(fast.patch_embed, _GemmPatchEmbed)
    with torch.no_grad():
        torch.testing.assert_close(_GemmPatchEmbed(src)(x), src(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mask", "fold"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_window_block_without_padding_rows_is_exact(mode, qkv_bias):
    """Windows of 6 on a 16×16 grid pad to 18×18: FastWindowBlock projects only the real tokens and must
    still give the padded keys/values the reference gives them (the qkv bias), or the outputs drift."""
    from conftest import randomize_

    cfg = SamConfig(encoder=ViTConfig(img_size=256, depth=2, embed_dim=96, num_heads=3, global_attn_indexes=(1,),
                                      window_size=6, qkv_bias=qkv_bias))
    enc = randomize_(Sam(cfg), seed=7, scale=0.2).image_encoder.eval()
    fast = make_fast_encoder(enc, torch.float32, attention=mode)
    assert [type(b) for b in fast.blocks] == [FastWindowBlock, vit.Block]
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), enc(x), atol=1e-5, rtol=1e-5)


def test_padded_bias_is_8_aligned_and_exact():
    attn = vit.Attention(48, 3, True, True, (14, 14))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 14, 14, 48)
    with torch.no_grad():
        torch.testing.assert_close(FastViTAttention.from_attention(attn)(x), attn(x), atol=1e-6, rtol=1e-5)
    from segany.fast import _padded_bias

    bias = _padded_bias(torch.randn(1, 2, 196, 14), torch.randn(1, 2, 196, 14))
    assert bias.shape == (1, 2, 196, 196) and bias.stride(2) % 8 == 0


@pytest.mark.parametrize("mode", ["mask", "fold", "mixed", "fused", "flex"])
def test_bf16_encoder_within_tolerance(tiny_sam, mode):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    fast = FastPath(tiny_sam, precision="bf16", attention=mode)
    with torch.no_grad():
        ref = tiny_sam.image_encoder(x)
    out = fast.encode(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel_err(ref, out) < BF16_REL_TOL


def test_predictor_bf16_agrees_with_fp32(tiny_sam, image):
    exact, quick = SamPredictor(tiny_sam), SamPredictor(tiny_sam, precision="bf16")
    assert exact.fast is None, "CPU default must stay on the exact fp32 modules"
    assert quick.fast is not None and quick.fast.dtype == torch.bfloat16
    exact.set_image(image)
    quick.set_image(image)
    for kwargs in (dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1])),
                   dict(box=np.array([20, 30, 200, 150]), multimask_output=False)):
        a = exact.predict(**kwargs, return_logits=True)
        b = quick.predict(**kwargs, return_logits=True)
        assert a[0].shape == b[0].shape and a[0].dtype == b[0].dtype == np.float32
        assert _rel_err(a[0], b[0]) < BF16_REL_TOL
        assert _rel_err(a[2], b[2]) < BF16_REL_TOL
        np.testing.assert_allclose(a[1], b[1], atol=0.02)
        masks_a = exact.predict(**kwargs)[0]
        masks_b = quick.predict(**kwargs)[0]
        assert masks_b.dtype == bool
        # Pixels whose fp32 logit is clearly off the threshold must not flip.
        clear = np.abs(a[0]) > BF16_REL_TOL * np.abs(a[0]).max() * 2
        assert (masks_a[clear] == masks_b[clear]).all()


def test_fp32_fast_path_is_exact(tiny_sam, image):
    exact, fp32 = SamPredictor(tiny_sam), SamPredictor(tiny_sam, precision="fp32")
    fp32.fast = FastPath(tiny_sam, precision="fp32")  # force the fast-path plumbing on CPU
    assert fp32.fast.encoder is tiny_sam.image_encoder
    exact.set_image(image)
    fp32.set_image(image)
    kwargs = dict(point_coords=np.array([[120, 80], [30, 40]]), point_labels=np.array([1, 0]), return_logits=True)
    for a, b in zip(exact.predict(**kwargs), fp32.predict(**kwargs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_predictor_fast_decoder_option_keeps_the_exact_encoder_and_agrees(tiny_sam, image):
    """``SamPredictor(fast_decoder=True)`` in fp32 on CPU (what the command line's auto picks on CPUs without
    native bf16): the reference encoder itself, FastMaskDecoder, logits equal to rounding."""
    exact, quick = SamPredictor(tiny_sam), SamPredictor(tiny_sam, precision="fp32", fast_decoder=True)
    assert exact.fast is None and quick.fast is not None
    assert quick.fast.encoder is tiny_sam.image_encoder and isinstance(quick.fast.decoder, FastMaskDecoder)
    exact.set_image(image)
    quick.set_image(image)
    for multimask in (True, False):
        kwargs = dict(point_coords=np.array([[120, 80], [30, 40]]), point_labels=np.array([1, 0]),
                      multimask_output=multimask, return_logits=True)
        a, b = exact.predict(**kwargs), quick.predict(**kwargs)
        scale = np.abs(a[0]).max()
        assert a[0].shape == b[0].shape and np.abs(a[0] - b[0]).max() < 1e-4 * scale
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)
        np.testing.assert_allclose(a[2], b[2], atol=1e-4 * np.abs(a[2]).max())


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict"])
def test_fp32_fast_decoder_follows_the_models_new_weights(tiny_sam, image, change):
    """The fp32 fast decoder shares the model's parameters but derived a few tensors (the first block's image
    side, the upscaler, the positional encoding) once: after the weights changed, a click mixed new and old
    weights (logits off by ~4, 16,403 of 72,000 pixels flipped)."""
    quick, exact = SamPredictor(tiny_sam, precision="fp32", fast_decoder=True), SamPredictor(tiny_sam)
    quick.set_image(image)
    kwargs = dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1]), return_logits=True)
    quick.predict(**kwargs)  # builds the per-image cache from the old weights
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if change == "optimizer_step":
            for p in [*tiny_sam.mask_decoder.parameters(), *tiny_sam.prompt_encoder.buffers()]:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        else:
            state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in tiny_sam.state_dict().items()}
            tiny_sam.load_state_dict(state)
    quick.set_image(image) if change == "load_state_dict" else None  # the encoder changed too
    exact.set_image(image)
    a, b = exact.predict(**kwargs), quick.predict(**kwargs)
    assert np.abs(a[0] - b[0]).max() < 1e-4 * np.abs(a[0]).max()
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_encode_images_batches(tiny_sam, image):
    other = np.ascontiguousarray(image[:150, :100])
    emb, input_sizes, original_sizes = encode_images(tiny_sam, [image, other, image], batch_size=2,
                                                     precision="fp32")
    assert emb.shape == (3, 256, 16, 16)
    assert original_sizes == [(200, 300), (150, 100), (200, 300)]
    assert input_sizes[0] == (171, 256) and input_sizes[1] == (256, 171)
    p = SamPredictor(tiny_sam)
    p.set_image(other)
    torch.testing.assert_close(emb[1:2], p.features, atol=1e-5, rtol=1e-5)


def test_bad_options():
    with pytest.raises(InputError, match="precision must be one of"):
        resolve_precision("int4", "cpu")
    with pytest.raises(InputError, match="fp16.*not supported on CPU"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"


def test_bad_attention_and_batch(tiny_sam, image):
    with pytest.raises(InputError, match="attention must be one of"):
        FastPath(tiny_sam, precision="bf16", attention="flash3")
    with pytest.raises(InputError, match="batch_size"):
        encode_images(tiny_sam, [image], batch_size=0)
    with pytest.raises(InputError, match="numpy arrays"):
        encode_images(tiny_sam, ["x.jpg"])  # type: ignore[list-item]


def test_configure_cpu_threads_restores():
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        n = configure_cpu_threads()
        assert n >= 1 and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode, graphs", [(None, False), ("default", False), ("reduce-overhead", True),
                                           ("max-autotune", True), ("max-autotune-no-cudagraphs", False)])
def test_mode_uses_cuda_graphs(mode, graphs):
    assert mode_uses_cuda_graphs(mode) is graphs


def test_inductor_cudagraphs_switch_counts_for_every_mode():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": True}):  # what TORCHINDUCTOR_CUDAGRAPHS=1 sets
        assert mode_uses_cuda_graphs(None) and mode_uses_cuda_graphs("default")
    assert not mode_uses_cuda_graphs(None)


def test_compile_cache_is_kept_apart_per_kernel_setting(monkeypatch, tmp_path):
    """A graph compiled under one window-kernel setting must not be served from disk under another: torch's
    AOTAutograd cache does not see the setting, so each gets its own directory; a user's own stays theirs."""
    from segany.kernels import window_attention as wk

    monkeypatch.setenv("SEGANY_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(wk, "TERMS", "select")
    select = compile_cache_dir()
    monkeypatch.setattr(wk, "TERMS", "gather")
    gather = compile_cache_dir()
    assert select != gather and select.parent == gather.parent == tmp_path / "compile-cache"
    assert select.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(gather)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_graph_replayed_encoder_output_is_copied_out(tiny_sam):
    """A compiled encoder that replays CUDA graphs writes each output into the same memory; an fp32 embedding
    handed to a predictor must not change when the next image is encoded (simulated: one shared buffer)."""
    fast = FastPath(tiny_sam, precision="fp32")
    buffer = torch.zeros(1, 256, 4, 4)

    def replay(x: torch.Tensor) -> torch.Tensor:
        buffer.fill_(float(x.mean()))
        return buffer

    fast._encode_fn, fast._encode_graphs = replay, True
    first = fast.encode(torch.ones(1, 3, 64, 64))
    second = fast.encode(torch.full((1, 3, 64, 64), 2.0))
    assert float(first.mean()) == 1.0 and float(second.mean()) == 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_bf16_with_graphs(tiny_sam, image):
    model = tiny_sam.cuda()
    p = SamPredictor(model)
    assert p.fast is not None and p.fast.dtype == torch.bfloat16 and p.fast._graphs is not None
    p.set_image(image)
    ref = SamPredictor(model, precision="fp32")
    ref.fast = None
    ref.set_image(image)
    kwargs = dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1]), return_logits=True)
    for _ in range(3):  # capture, then replays
        a, b = ref.predict(**kwargs), p.predict(**kwargs)
        assert _rel_err(a[0], b[0]) < BF16_REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_fused_attention_bf16(tiny_sam, compiled):
    """The Triton rel-pos kernel in bf16 on the GPU (CI's interpreter cannot run bf16 dots), eager and compiled."""
    model = tiny_sam.cuda()
    x = torch.randn(2, 3, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    fast = FastPath(model, precision="bf16", attention="fused", compile="default" if compiled else False)
    assert {b.attn.mode for b in fast.encoder.modules() if isinstance(b, vit.Block) and b.window == 0} == {"fused"}
    windowed = [b for b in fast.encoder.modules() if isinstance(b, FastWindowBlock)]
    assert windowed and all(b._kernel_applies(x) for b in windowed)  # the window kernel, not the fold
    with torch.no_grad():
        ref = model.image_encoder(x)
    assert _rel_err(ref, fast.encode(x)) < BF16_REL_TOL
    assert _rel_err(FastPath(model, precision="bf16", attention="mask").encode(x), fast.encode(x)) < BF16_REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_arrays_are_pinned_copies_that_stay_put():
    from segany.predictor import host_arrays

    a = torch.rand(3, 64, 80, device="cuda")
    m, s = host_arrays(a > 0.5, a[:, 0, 0])
    np.testing.assert_array_equal(m, (a > 0.5).cpu().numpy())
    np.testing.assert_array_equal(s, a[:, 0, 0].cpu().numpy())
    first = m.copy()
    for _ in range(3):  # later copies must not land in arrays already handed out
        host_arrays(torch.ones(3, 64, 80, dtype=torch.bool, device="cuda"))
    np.testing.assert_array_equal(m, first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_for_box_and_mask_prompts(tiny_sam, image):
    model = tiny_sam.cuda()
    p = SamPredictor(model)
    assert p.fast is not None and p.fast._graphs is not None
    p.set_image(image)
    ref = SamPredictor(model, precision="fp32")
    ref.fast = None
    ref.set_image(image)
    low = ref.predict(point_coords=np.array([[120, 80]]), point_labels=np.array([1]))[2][:1]
    prompts = [dict(box=np.array([20, 30, 250, 180])),
               dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1]), box=np.array([20, 30, 250, 180])),
               dict(point_coords=np.array([[120, 80]]), point_labels=np.array([1]), mask_input=low)]
    for kwargs in prompts:
        for _ in range(2):  # capture, then a replay
            a, b = ref.predict(**kwargs, return_logits=True), p.predict(**kwargs, return_logits=True)
            assert _rel_err(a[0], b[0]) < BF16_REL_TOL
    assert len(p.fast._graphs.entries) == 3 and p.fast._graphs.enabled


class _NoHostTraffic(TorchDispatchMode):
    """Records the ops a CUDA graph cannot capture: a tensor made from host data (``torch.tensor``: a copy
    from pageable memory, refused during capture), and a value read back or a data-dependent size (a sync)."""

    FORBIDDEN = ("aten.lift_fresh", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.FORBIDDEN) or (name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
            self.bad.append(name)
        return func(*args, **(kwargs or {}))


class _CallThroughGraphs:
    """Stands in for the CUDA-graph cache on CPU: runs the function it would capture, records the keys, and
    fails on any op the capture would refuse (the GPU found one, 2026-11-26: ``torch.tensor`` of the frame
    size in the prompt encoder, which silently turned graphs off for every click)."""

    def __init__(self) -> None:
        self.keys: list = []

    def __call__(self, key, fn, inputs):
        self.keys.append((key, tuple((tuple(t.shape), t.dtype) for t in inputs)))
        with _NoHostTraffic() as mode:
            out = fn(*inputs)
        assert not mode.bad, f"not capturable in a CUDA graph: {mode.bad}"
        return out


@pytest.mark.parametrize("prompt", ["points", "box", "points+box", "points+mask"])
def test_graphed_decode_carries_every_prompt_kind(tiny_sam, prompt):
    """The graphed decode runs the prompt encoder inside the captured function: every prompt kind must reach
    it intact (checked against the eager path) and be part of the graph's key."""
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(1, 256, 16, 16, generator=g)
    points = (torch.tensor([[[100.0, 60.0], [10.0, 200.0]]]), torch.tensor([[1, 0]])) if "points" in prompt else None
    box = torch.tensor([[20.0, 30.0, 180.0, 150.0]]) if "box" in prompt else None
    mask = torch.randn(1, 1, 64, 64, generator=g) if "mask" in prompt else None
    args = (points, box, mask, True, (256, 256), (200, 300), True)
    eager = FastPath(tiny_sam, precision="bf16")
    graphed = FastPath(tiny_sam, precision="bf16")
    graphed._graphs = _CallThroughGraphs()
    for a, b in zip(eager.decode(feats, *args), graphed.decode(feats, *args), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    (key, shapes), = graphed._graphs.keys
    assert key[1] == (points is not None, box is not None, mask is not None)
    assert len(shapes) == 1 + 2 * (points is not None) + (box is not None) + (mask is not None)


def test_fast_mask_decoder_matches_reference(tiny_sam):
    from segany.fast import FastMaskDecoder

    pe = tiny_sam.prompt_encoder
    fast = FastMaskDecoder(tiny_sam.mask_decoder, pe.get_dense_pe())
    g = torch.Generator().manual_seed(3)
    feats_a, feats_b = torch.randn(1, 256, 16, 16, generator=g), torch.randn(1, 256, 16, 16, generator=g)
    one = (torch.tensor([[[100.0, 60.0]]]), torch.tensor([[1]]))
    two = (torch.tensor([[[100.0, 60.0], [10, 20]], [[5.0, 6.0], [200, 100]]]), torch.tensor([[1, 0], [1, 1]]))
    masks = torch.randn(2, 1, 64, 64, generator=g)
    with torch.no_grad():
        for feats in (feats_a, feats_b, feats_a.clone()):  # a new tensor must never hit a stale cache
            for points, mask_in in ((one, None), (two, None), (two, masks)):
                sparse, dense = pe(points, None, mask_in)
                for multimask in (True,) if mask_in is None else (False,):
                    ref = tiny_sam.mask_decoder(feats, pe.get_dense_pe(), sparse, dense, multimask)
                    for _ in range(2):  # second call hits the per-image cache
                        out = fast(feats, pe.get_dense_pe(), sparse, dense, multimask, mask_in is None)
                        for r, o in zip(ref, out, strict=True):
                            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
        feats_a.add_(1.0)  # in-place change bumps the version: cache must miss
        sparse, dense = pe(one, None, None)
        ref = tiny_sam.mask_decoder(feats_a, pe.get_dense_pe(), sparse, dense, True)
        torch.testing.assert_close(fast(feats_a, None, sparse, dense, True, True)[0], ref[0], atol=1e-5, rtol=1e-4)


def test_enable_fast_path_fp32_fast_decoder(tiny_sam, image):
    from segany.fast import FastMaskDecoder, enable_fast_path

    exact, quick = SamPredictor(tiny_sam), SamPredictor(tiny_sam)
    fp = enable_fast_path(quick, precision="fp32", fast_decoder=True)
    assert isinstance(fp.decoder, FastMaskDecoder) and quick.fast is fp
    exact.set_image(image)
    quick.set_image(image)
    for _ in range(2):
        a = exact.predict(np.array([[120, 80]]), np.array([1]), return_logits=True)
        b = quick.predict(np.array([[120, 80]]), np.array([1]), return_logits=True)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("input_hw", [(768, 1024), (1024, 683), (1024, 1024), (1, 1024), (1023, 5)])
def test_upscale_cropped_is_exact(input_hw):
    import torch.nn.functional as F

    from segany.fast import upscale_cropped

    low = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    ref = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)[..., : input_hw[0], : input_hw[1]]
    torch.testing.assert_close(upscale_cropped(low, 1024, input_hw), ref, atol=0, rtol=0)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("orig,input_size", [((768, 1024), (768, 1024)), ((425, 640), (680, 1024))])
def test_fast_prompt_path_iou_vs_exact_vit_b(orig, input_size):
    """The CPU prompt→mask fast paths on the ViT-B decoder (bench/speed.py's one-point prompt, the bench's
    768×1024 frame and the 640×425 sample's): bf16 masks IoU ≥ 0.99, fp32 fast decoder ≥ 0.9999 / 1e-5."""
    from segany.checkpoints import build_sam
    from segany.fast import enable_fast_path

    torch.manual_seed(0)
    model = build_sam("vit_b").eval()
    feats = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    exact, bf16, f32 = SamPredictor(model), SamPredictor(model, precision="bf16"), SamPredictor(model)
    enable_fast_path(f32, precision="fp32", fast_decoder=True)
    for p in (exact, bf16, f32):  # same embedding for all: this checks the decoder and post-processing
        p.features, p.input_size, p.original_size, p.is_image_set = feats, input_size, orig, True
    point, label = np.array([[600, 400]]), np.array([1])
    for _ in range(2):  # the second click reuses the cached image side
        ref = exact.predict(point, label)
        for mask_ref, mask in zip(ref[0], bf16.predict(point, label)[0], strict=True):
            assert _mask_iou(mask_ref, mask) >= 0.99
        for mask_ref, mask in zip(ref[0], f32.predict(point, label)[0], strict=True):
            assert _mask_iou(mask_ref, mask) >= 0.9999
    logits_ref = exact.predict(point, label, return_logits=True)
    logits = f32.predict(point, label, return_logits=True)
    for x, y in zip(logits_ref, logits, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5)


def test_auto_attention_picks_the_measured_fastest_mode(tiny_sam, monkeypatch):
    """``attention="auto"``: the Triton kernel on Ampere+ GPUs (the fastest mode on an H200, eager and
    compiled); elsewhere ``mixed`` when compiled and ``mask`` eagerly, and ``mask`` on the CPU."""
    from segany import fast as fast_mod
    from segany.fast import resolve_attention

    assert resolve_attention("auto", "cpu") == "mask" and resolve_attention("auto", "cpu", "max-autotune") == "mask"
    for mode in ("mask", "fold", "mixed", "fused", "flex"):
        assert resolve_attention(mode, "cuda") == mode  # explicit choices are kept, also on CUDA
    with pytest.raises(InputError, match="attention must be one of"):
        resolve_attention("fast", "cpu")
    with pytest.raises(InputError, match="attention must be one of"):
        FastViTAttention(tiny_sam.image_encoder.blocks[0].attn, "auto")  # a module needs a concrete mode

    capability = [(9, 0)]
    monkeypatch.setattr(fast_mod.relpos_kernel, "available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert resolve_attention("auto", "cuda") == "fused"
    assert resolve_attention("auto", "cuda:0", compile=True) == "fused"
    assert resolve_attention("auto", "cuda", compile="max-autotune") == "fused"
    capability[0] = (7, 5)  # Turing: no bf16 tensor-core dots for the kernel
    assert resolve_attention("auto", "cuda") == "mask"
    assert resolve_attention("auto", "cuda", compile=True) == "mixed"
    capability[0] = (8, 0)
    monkeypatch.setattr(fast_mod.relpos_kernel, "available", lambda device: False)  # no Triton
    assert resolve_attention("auto", "cuda") == "mask"
    assert resolve_attention("auto", "cuda", compile="default") == "mixed"

    fp = FastPath(tiny_sam, precision="bf16")
    assert fp.attention == "mask"
    assert {b.attn.mode for b in fp.encoder.modules() if isinstance(b, vit.Block)} == {"mask"}
    assert {b.attn.mode for b in make_fast_encoder(tiny_sam.image_encoder, torch.float32).modules()
            if isinstance(b, vit.Block)} == {"mask"}


def test_bf16_on_a_cpu_without_native_bf16_warns(tiny_sam, monkeypatch, caplog):
    """Emulated bf16 can be 30x slower than fp32 (MobileSAM's set_image: 56 s against 1.7 s on an AMD EPYC
    without AVX512-BF16), so asking for it there is worth a warning that says what to use instead."""
    import logging

    monkeypatch.setenv("SEGANY_CPU_BF16", "0")
    with caplog.at_level(logging.WARNING, logger="segany.fast"):
        FastPath(tiny_sam, precision="bf16")
    assert any("without native bf16" in r.getMessage() and "'fp32'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")
    with caplog.at_level(logging.WARNING, logger="segany.fast"):
        FastPath(tiny_sam, precision="bf16")
        FastPath(tiny_sam, precision="fp32")
    assert not [r for r in caplog.records if "native bf16" in r.getMessage()]


def test_importing_the_fast_path_and_building_a_predictor_leave_the_process_alone():
    """The Triton ops are registered when a fused encoder is built, not at import: registering one imports
    Inductor, 1.5 s that every `segany predict` on a CPU paid at start for kernels it never runs. And OpenCV's
    import prepends its folder (and an empty entry: the current directory) to LD_LIBRARY_PATH, which child
    processes inherit; building even the exact fp32 predictor imported it through the fast path."""
    import os
    import subprocess
    import sys

    probe = ("import os, sys\nimport segany.predictor, segany.fast\nprint('torch._inductor' in sys.modules)\n"
             "from segany.modeling.config import SamConfig, ViTConfig\nfrom segany.modeling.sam import Sam\n"
             "from segany.predictor import SamPredictor\n"
             "SamPredictor(Sam(SamConfig(encoder=ViTConfig(img_size=64, depth=1, embed_dim=32, num_heads=2, "
             "global_attn_indexes=(0,), window_size=0))))\n"
             "print(repr(os.environ.get('LD_LIBRARY_PATH')), 'cv2' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "None", "False"], r.stdout


def test_int8_scaling_fusion_is_on_only_around_the_compiled_encoder(tiny_sam):
    """FastPath(quantize="int8", compile=...) set Inductor's force_fuse_int_mm_with_mul for the whole process,
    so every later torch.compile of the user's own code ran with it."""
    import torch._inductor.config as inductor_config

    from segany.fast import FastPath, _with_int8_scaling_fused

    assert inductor_config.force_fuse_int_mm_with_mul is False
    fast = FastPath(tiny_sam, precision="bf16", quantize="int8", compile=True)
    assert inductor_config.force_fuse_int_mm_with_mul is False and fast.quantize == "int8"
    seen = _with_int8_scaling_fused(lambda x: inductor_config.force_fuse_int_mm_with_mul)(torch.zeros(1))
    assert seen is True and inductor_config.force_fuse_int_mm_with_mul is False
