"""The automatic mask generator splits prompt batches on the CPU fast path, with unchanged masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.amg import generator as gen
from segany.amg.generator import SamAutomaticMaskGenerator, cpu_batch_size
from segany.predictor import SamPredictor


@pytest.mark.parametrize(("ppb", "hw", "want"), [
    (64, (425, 640), 8),  # 3.3 MB of logits a prompt: 8 fit the 28 MiB budget
    (64, (240, 320), 31),
    (64, (2250, 1500), 8),  # never below 8: batched GEMMs are worth more than the faults
    (4, (2250, 1500), 4),  # never above what the user asked for
    (64, (32, 32), 64),
])
def test_cpu_batch_size(ppb: int, hw: tuple[int, int], want: int) -> None:
    assert cpu_batch_size(ppb, hw) == want
    if want < ppb and want > gen.CPU_MIN_BATCH:
        assert want * 3 * hw[0] * hw[1] * 4 <= gen.CPU_LOGITS_BUDGET_BYTES


def _masks(amg: SamAutomaticMaskGenerator, image: np.ndarray) -> list[np.ndarray]:
    return [r["segmentation"] for r in amg.generate(image)]


def test_fast_path_batches_are_split_and_masks_unchanged(monkeypatch: pytest.MonkeyPatch, tiny_sam) -> None:
    image = (np.random.RandomState(1).rand(300, 400, 3) * 255).astype(np.uint8)
    amg = SamAutomaticMaskGenerator(tiny_sam, points_per_side=8, points_per_batch=64, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, box_nms_thresh=0.9)
    amg.predictor = SamPredictor(tiny_sam, precision="fp32", fast_decoder=True)
    sizes: list[int] = []
    real = amg.predictor.predict_torch

    def spy(coords: torch.Tensor, *args, **kwargs):
        sizes.append(int(coords.shape[0]))
        return real(coords, *args, **kwargs)

    monkeypatch.setattr(amg.predictor, "predict_torch", spy)
    split = _masks(amg, image)
    assert sizes == [20, 20, 20, 4]  # 1.44 MB of logits a prompt on 300×400
    sizes.clear()
    monkeypatch.setattr(gen, "cpu_batch_size", lambda ppb, hw: ppb)  # as before: one batch of 64
    whole = _masks(amg, image)
    assert sizes == [64]
    assert len(split) == len(whole) > 0
    assert all(np.array_equal(a, b) for a, b in zip(split, whole, strict=True))


def test_exact_path_keeps_the_configured_batches(monkeypatch: pytest.MonkeyPatch, tiny_sam) -> None:
    """Without a fast path the generator stays the reference's, batch for batch."""
    image = (np.random.RandomState(1).rand(300, 400, 3) * 255).astype(np.uint8)
    amg = SamAutomaticMaskGenerator(tiny_sam, points_per_side=8, points_per_batch=64)
    assert amg.predictor.fast is None
    sizes: list[int] = []
    real = amg.predictor.predict_torch
    monkeypatch.setattr(amg.predictor, "predict_torch", lambda c, *a, **k: sizes.append(int(c.shape[0])) or real(c, *a, **k))
    amg.generate(image)
    assert sizes == [64]
