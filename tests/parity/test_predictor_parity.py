"""Predictor parity with the reference implementations on a real photo and seeded random weights.

ViT-B and ``vit_t`` run at the full 1024 px input; ``tiny`` (the test config) at 256 px. For each, the
reference model's weights load into segany strictly (and back), then both ``SamPredictor``s embed
``sample.jpg`` once and decode the same prompts. Tolerance: 1e-4 max abs diff in fp32 on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sam_oracle import (
    assert_close,
    assert_masks_match,
    mobile_sam_predictor,
    randomize_realistic_,
    reference_mobile_sam,
    reference_predictor,
    reference_sam,
)

from segany.errors import PromptError
from segany.modeling.config import SamConfig
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor
from segany.registry import get_config

pytestmark = pytest.mark.parity


@dataclass
class Pair:
    name: str
    ours: SamPredictor
    ref: Any
    size_hw: tuple[int, int]


def _config(name: str) -> SamConfig:
    return tiny_config() if name == "tiny" else get_config(name)


MODELS = ["tiny", "vit_t", "vit_b"]


class Pairs:
    """Predictor pairs built on first use and kept for the module: a ViT-B encode takes ~15 s."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.cache: dict[str, Pair] = {}

    def __getitem__(self, name: str) -> Pair:
        if name not in self.cache:
            self.cache[name] = self._build(name)
        return self.cache[name]

    def _build(self, name: str) -> Pair:
        cfg = _config(name)
        ref_model = reference_mobile_sam(cfg) if name == "vit_t" else reference_sam(cfg)
        randomize_realistic_(ref_model, seed=3)
        ours_model = Sam(cfg)
        ours_model.load_state_dict(ref_model.state_dict(), strict=True)
        ours_model.eval()
        ref_model.load_state_dict(ours_model.state_dict(), strict=True)  # and back
        ref_model.eval()  # after loading: MobileSAM caches attention biases in eval()
        ours = SamPredictor(ours_model)
        ref = mobile_sam_predictor(ref_model) if name == "vit_t" else reference_predictor(ref_model)
        ours.set_image(self.image)
        ref.set_image(self.image)
        return Pair(name, ours, ref, self.image.shape[:2])


@pytest.fixture(scope="module")
def pairs(sample_image: np.ndarray) -> Iterator[Pairs]:
    cache = Pairs(sample_image)
    yield cache
    cache.cache.clear()


@pytest.fixture(params=MODELS)
def pair(request: pytest.FixtureRequest, pairs: Pairs) -> Pair:
    return pairs[request.param]


def test_image_embeddings(pair: Pair) -> None:
    ours, ref = pair.ours.get_image_embedding(), pair.ref.get_image_embedding()
    assert ours.shape == ref.shape == (1, 256, *(2 * [pair.ours.model.cfg.embed_size]))
    assert float(ref.abs().max()) > 0.5, "embedding too small for a meaningful comparison"
    assert_close(ours, ref, f"{pair.name} image embedding")
    assert pair.ours.input_size == pair.ref.input_size
    assert pair.ours.original_size == pair.ref.original_size


def _prompts(h: int, w: int) -> dict[str, dict[str, Any]]:
    # The sample photo is 640x425; prompts sit on real content and near the borders.
    fg = np.array([[0.5 * w, 0.55 * h]])
    return {
        "point_multimask": dict(point_coords=fg, point_labels=np.array([1]), multimask_output=True),
        "points_single": dict(point_coords=np.array([[0.5 * w, 0.55 * h], [0.1 * w, 0.1 * h]]),
                              point_labels=np.array([1, 0]), multimask_output=False),
        "box_single": dict(box=np.array([0.2 * w, 0.15 * h, 0.8 * w, 0.9 * h]), multimask_output=False),
        "box_and_points": dict(box=np.array([0.2 * w, 0.15 * h, 0.8 * w, 0.9 * h]),
                               point_coords=np.array([[0.5 * w, 0.5 * h], [0.25 * w, 0.2 * h]]),
                               point_labels=np.array([1, 0]), multimask_output=True),
        "edge_point": dict(point_coords=np.array([[w - 1.0, h - 1.0]]), point_labels=np.array([1]),
                           multimask_output=False),
        # a detector's box that sticks out of the image: passed on unclipped, as the reference does
        "box_partly_outside": dict(box=np.array([0.6 * w, 0.5 * h, 1.3 * w, 1.4 * h]), multimask_output=True),
    }


# The decoder is shared by all encoders, so vit_t (whose encoder is what differs) runs a subset.
CASES = [(m, c) for m in MODELS for c in _prompts(1, 1) if m != "vit_t" or c in ("point_multimask", "box_and_points")]


@pytest.mark.parametrize(("model", "case"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_predict(pairs: Pairs, model: str, case: str) -> None:
    pair = pairs[model]
    kwargs = _prompts(*pair.size_hw)[case]
    ours_logits, ours_iou, ours_low = pair.ours.predict(**kwargs, return_logits=True)
    ref_logits, ref_iou, ref_low = pair.ref.predict(**kwargs, return_logits=True)
    n = 3 if kwargs["multimask_output"] else 1
    assert ours_logits.shape == (n, *pair.size_hw) and ours_low.shape[0] == ours_iou.shape[0] == n
    assert float(np.abs(ref_low).max()) > 0.5, "logits too small for a meaningful comparison"
    assert_close(ours_low, ref_low, f"{case} low-res logits")
    assert_close(ours_iou, ref_iou, f"{case} IoU predictions")
    assert_close(ours_logits, ref_logits, f"{case} full-size logits (return_logits=True)")

    ours_masks, ours_iou2, _ = pair.ours.predict(**kwargs)
    assert ours_masks.dtype == np.bool_
    np.testing.assert_array_equal(ours_iou2, ours_iou)
    # The reference's boolean masks are exactly its logits > mask_threshold (0.0); saves a decode.
    assert_masks_match(ours_masks, ref_logits > 0.0, ours_logits)


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_with_mask_input(pair: Pair, multimask: bool) -> None:
    """Refinement: feed back the best low-res logits from a first click, add a second click."""
    h, w = pair.size_hw
    first = dict(point_coords=np.array([[0.5 * w, 0.55 * h]]), point_labels=np.array([1]))
    _, iou, low = pair.ref.predict(**first)
    mask_input = low[int(np.argmax(iou))][None]  # (1, 256, 256)
    kwargs = dict(point_coords=np.array([[0.5 * w, 0.55 * h], [0.3 * w, 0.4 * h]]), point_labels=np.array([1, 1]),
                  mask_input=mask_input, multimask_output=multimask)
    ours_logits, ours_iou, ours_low = pair.ours.predict(**kwargs, return_logits=True)
    ref_logits, ref_iou, ref_low = pair.ref.predict(**kwargs, return_logits=True)
    assert_close(ours_low, ref_low, "mask_input low-res logits")
    assert_close(ours_iou, ref_iou, "mask_input IoU predictions")
    assert_close(ours_logits, ref_logits, "mask_input logits")
    ours_masks, _, _ = pair.ours.predict(**kwargs)
    assert_masks_match(ours_masks, ref_logits > 0.0, ours_logits)


def _boxes(h: int, w: int, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, 0.5 * w, n)
    y0 = rng.uniform(0, 0.5 * h, n)
    return np.stack([x0, y0, x0 + rng.uniform(0.2, 0.5, n) * w, y0 + rng.uniform(0.2, 0.5, n) * h], axis=1)


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_torch_many_boxes(pair: Pair, multimask: bool) -> None:
    h, w = pair.size_hw
    boxes = torch.as_tensor(_boxes(h, w), dtype=torch.float32)
    ours_boxes = pair.ours.transform.apply_boxes_torch(boxes, (h, w))
    ref_boxes = pair.ref.transform.apply_boxes_torch(boxes, (h, w))
    assert_close(ours_boxes, ref_boxes, "transformed boxes", tol=1e-5)
    ours = pair.ours.predict_torch(None, None, boxes=ref_boxes, multimask_output=multimask, return_logits=True)
    ref = pair.ref.predict_torch(None, None, boxes=ref_boxes, multimask_output=multimask, return_logits=True)
    n = 3 if multimask else 1
    assert ours[0].shape == (len(boxes), n, h, w)
    for what, a, b in zip(("logits", "IoU predictions", "low-res logits"), ours, ref, strict=True):
        assert_close(a, b, f"batched boxes {what}")
    masks_ours = pair.ours.predict_torch(None, None, boxes=ref_boxes, multimask_output=multimask)[0]
    assert_masks_match(masks_ours, ref[0] > 0.0, ours[0])


def test_predict_torch_batched_points(pair: Pair) -> None:
    h, w = pair.size_hw
    rng = np.random.default_rng(1)
    coords = torch.as_tensor(rng.uniform(0, 1, (5, 3, 2)) * [w, h], dtype=torch.float32)  # (B=5, N=3, 2)
    # the last row passes box corners as labels 2/3, as code written for SAM's ONNX model does: the
    # reference's prompt encoder gives them their positional encoding only, and so must ours
    labels = torch.as_tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, -1, -1], [2, 3, 1]])
    coords = pair.ref.transform.apply_coords_torch(coords, (h, w))
    ours = pair.ours.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    ref = pair.ref.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    for what, a, b in zip(("logits", "IoU predictions", "low-res logits"), ours, ref, strict=True):
        assert_close(a, b, f"batched points {what}")


def test_predict_torch_reference_shapes(pairs: Pairs) -> None:
    """Shapes the reference accepts in ``predict_torch``: boxes (B, 1, 4), as its own ``predict`` passes them,
    and one (1, 1, 256, 256) ``mask_input`` shared by B prompts (broadcast, as if repeated B times)."""
    pair = pairs["tiny"]
    h, w = pair.size_hw
    boxes = pair.ref.transform.apply_boxes_torch(torch.as_tensor(_boxes(h, w, 3), dtype=torch.float32), (h, w))
    side = 4 * pair.ours.model.prompt_encoder.image_embedding_size[0]
    mask = torch.randn(1, 1, side, side, generator=torch.Generator().manual_seed(0))
    for kwargs in ({"boxes": boxes[:, None]}, {"boxes": boxes, "mask_input": mask}):
        ours = pair.ours.predict_torch(None, None, return_logits=True, **kwargs)
        ref = pair.ref.predict_torch(None, None, return_logits=True, **kwargs)
        for what, a, b in zip(("logits", "IoU predictions", "low-res logits"), ours, ref, strict=True):
            assert_close(a, b, f"{sorted(kwargs)} {what}")
    with pytest.raises(PromptError, match="mask_input must have batch size 1 or that of the prompts"):
        pair.ours.predict_torch(None, None, boxes=boxes, mask_input=mask.expand(2, -1, -1, -1))
    with pytest.raises(PromptError, match="share the batch size"):
        pair.ours.predict_torch(boxes[:2, None, :2], torch.ones(2, 1), boxes=boxes)
