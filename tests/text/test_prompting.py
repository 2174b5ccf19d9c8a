"""Text prompts on a tiny random SAM (text audit findings 7, 8): a label given twice counts once, and
``predict(text=..., point_coords=...)`` returns its candidates best first, as text alone does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config

from segany.modeling.sam import Sam
from segany.predictor import SamPredictor
from segany.text.prompting import label_masks, make_vocabulary
from segany.train.labels import with_labels

NAMES = ("person", "dog", "car")


@pytest.fixture(scope="module")
def open_predictor(sample_image: np.ndarray) -> SamPredictor:
    """Class head with a CLIP projection and the random tiny CLIP: open-vocabulary labels work."""
    torch.manual_seed(0)
    model = randomize_(Sam(with_labels(tiny_config(), NAMES, clip_model="clip_tiny_test")), seed=3).eval()
    p = SamPredictor(model)
    p.set_image(sample_image)
    return p


@pytest.fixture(scope="module")
def sample_image() -> np.ndarray:
    from conftest import SAMPLE_IMAGE

    from segany.data.images import load_image

    return load_image(SAMPLE_IMAGE)


def test_a_label_given_twice_counts_once(open_predictor: SamPredictor, sample_image: np.ndarray) -> None:
    masks = np.zeros((2, *sample_image.shape[:2]), dtype=bool)
    masks[0, 10:60, 20:90] = True
    masks[1, 100:200, 50:300] = True
    once_names, once = label_masks(open_predictor, masks, ["zebra"])
    twice_names, twice = label_masks(open_predictor, masks, ["zebra", "Zebra.", "zebra"])
    assert once_names == twice_names == ["zebra", "zebra"]
    np.testing.assert_allclose(twice, once, rtol=1e-5)  # not halved by a copy of itself
    vocab = make_vocabulary(open_predictor.model, ["zebra", "person", "Zebra.", "the person"], predictor=open_predictor)
    assert vocab.names == ["zebra", "person"] and vocab.text_emb is not None and len(vocab.text_emb) == 2
    assert make_vocabulary(open_predictor.model, ["dog", "Dog"]).names == ["dog"]  # closed too


def test_text_with_a_point_returns_candidates_best_first(open_predictor: SamPredictor) -> None:
    p = open_predictor
    model = p.model
    for xy in ([320, 200], [100, 300], [500, 250], [50, 50], [600, 400]):
        masks, scores, low = p.predict(point_coords=[xy], point_labels=[1], text="dog")
        assert masks.shape[0] == scores.shape[0] == low.shape[0] == 3
        assert list(scores) == sorted(scores, reverse=True), (xy, scores)
        # masks, scores and low-res logits stay together: each mask is its own logits upscaled
        assert p.input_size is not None and p.original_size is not None
        up = model.postprocess_masks(torch.as_tensor(low)[:, None], p.input_size, p.original_size)[:, 0]
        np.testing.assert_array_equal((up > model.mask_threshold).numpy(), masks)
    one, s1, _ = p.predict(point_coords=[[320, 200]], point_labels=[1], text="dog", multimask_output=False)
    assert one.shape[0] == s1.shape[0] == 1
