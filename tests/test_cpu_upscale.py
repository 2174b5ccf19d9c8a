"""OpenCV post-processing of the CPU fast path against the reference's two ``interpolate`` calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segany import cpu_upscale


def _reference(low: torch.Tensor, img_size: int, input_hw: tuple[int, int], original_hw: tuple[int, int]
               ) -> torch.Tensor:
    """The reference's post-processing in float64, where torch's source coordinates are exact to ~1e-15."""
    up = F.interpolate(low.double(), (img_size, img_size), mode="bilinear", align_corners=False)
    up = up[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(up, original_hw, mode="bilinear", align_corners=False)


CASES = [
    # (img_size, low-res side, input_hw, original_hw)
    (1024, 256, (768, 1024), (768, 1024)),  # landscape, no final resize
    (1024, 256, (1024, 683), (1200, 800)),  # portrait, upscaled to the original
    (1024, 256, (1024, 1024), (1500, 1500)),  # a square image larger than the frame
    (1024, 256, (576, 1024), (360, 640)),  # downscaled to the original
    (1024, 256, (1, 1024), (1, 1024)),
    (1023, 256, (767, 1023), (600, 800)),  # not an integer scale: the full frame is upsampled
    (512, 128, (341, 512), (480, 720)),
]


@pytest.mark.parametrize(("img_size", "side", "input_hw", "original_hw"), CASES)
def test_logits_agree_with_the_reference_to_rounding(img_size, side, input_hw, original_hw):
    """Within 2e-5 of the exact resize on logits of ±30. The reference's own fp32 ``interpolate`` is off by up
    to ~1e-3 on non-integer scales (it forms source coordinates in fp32); OpenCV forms them in double."""
    low = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(7)) * 8
    ref = _reference(low, img_size, input_hw, original_hw)
    got = cpu_upscale.upscale_logits(low, img_size, input_hw, original_hw, None)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=0)
    if input_hw != original_hw:  # a non-integer final resize: closer to exact than the fp32 reference
        up = F.interpolate(low, (img_size, img_size), mode="bilinear", align_corners=False)
        fp32_ref = F.interpolate(up[..., : input_hw[0], : input_hw[1]], original_hw, mode="bilinear",
                                 align_corners=False)
        assert (got.double() - ref).abs().max() < (fp32_ref.double() - ref).abs().max()


@pytest.mark.parametrize(("img_size", "side", "input_hw", "original_hw"), CASES[:4])
def test_masks_are_the_thresholded_logits(img_size, side, input_hw, original_hw):
    low = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(3)) * 8
    ref = _reference(low, img_size, input_hw, original_hw)
    got = cpu_upscale.upscale_logits(low, img_size, input_hw, original_hw, 0.0)
    assert got.dtype == torch.bool and got.shape == ref.shape
    # A pixel may only differ where the reference logit is within rounding of the threshold.
    differ = got != (ref > 0.0)
    assert bool((ref[differ].abs() < 2e-5).all())
    assert differ.sum() <= 2
    # A non-zero threshold is honoured.
    high = cpu_upscale.upscale_logits(low, img_size, input_hw, original_hw, 5.0)
    assert int(high.sum()) == pytest.approx(int((ref > 5.0).sum()), abs=2) and int(high.sum()) < int(got.sum())


def test_outputs_are_fresh_tensors_per_call():
    """The returned masks must not alias a scratch buffer that the next click overwrites."""
    low = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    a = cpu_upscale.upscale_logits(low, 1024, (768, 1024), (768, 1024), 0.0)
    keep = a.clone()
    cpu_upscale.upscale_logits(-low, 1024, (768, 1024), (768, 1024), 0.0)
    assert torch.equal(a, keep)


def test_applies_only_to_eager_fp32_cpu_logits():
    low = torch.zeros(1, 3, 256, 256)
    assert cpu_upscale.applies(low, (768, 1024))
    assert not cpu_upscale.applies(low.to(torch.bfloat16), (768, 1024))
    assert not cpu_upscale.applies(low[0], (768, 1024))
    assert not cpu_upscale.applies(low, (40000, 10))
    assert not cpu_upscale.applies(low.to("meta"), (768, 1024))


@pytest.fixture
def image() -> np.ndarray:
    return (np.random.RandomState(0).rand(200, 300, 3) * 255).astype(np.uint8)


def test_fast_path_decode_uses_it_on_cpu(monkeypatch, tiny_sam, image):
    """The CPU fast path's predict goes through OpenCV and agrees with the exact predictor."""
    from segany.predictor import SamPredictor

    calls = []
    real = cpu_upscale.upscale_logits

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_upscale, "upscale_logits", spy)
    exact, quick = SamPredictor(tiny_sam), SamPredictor(tiny_sam, precision="fp32", fast_decoder=True)
    exact.set_image(image)
    quick.set_image(image)
    pt, lb = np.array([[120, 80]]), np.array([1])
    m0, s0, l0 = exact.predict(pt, lb)
    m1, s1, l1 = quick.predict(pt, lb)
    assert calls == [tuple(image.shape[:2])]
    assert m1.dtype == bool and m1.shape == m0.shape
    assert (m0 != m1).mean() < 1e-4
    np.testing.assert_allclose(s0, s1, atol=1e-5)
    logits0 = exact.predict(pt, lb, return_logits=True)[0]
    logits1 = quick.predict(pt, lb, return_logits=True)[0]
    np.testing.assert_allclose(logits0, logits1, atol=1e-4)


@pytest.mark.parametrize(("torch_n", "cv_n", "after"), [(1, 8, 1), (2, 1, 1)])
def test_opencv_uses_no_more_threads_than_torch(torch_n: int, cv_n: int, after: int):
    # OpenCV's pool was sized to every core, so `--threads 1` (to keep a core free) still used them all here;
    # an application's own lower OpenCV setting stays.
    import cv2

    before_torch, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    try:
        torch.set_num_threads(torch_n)
        cv2.setNumThreads(cv_n)
        cpu_upscale.upscale_logits(torch.randn(1, 1, 64, 64), 256, (200, 256), (400, 512), 0.0)
        assert cv2.getNumThreads() == after
    finally:
        torch.set_num_threads(before_torch)
        cv2.setNumThreads(before_cv)
