"""scripts/label_probe.py: the diagnostic behind issue 10's reading must itself be right."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segany.predictor import SamPredictor

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "label_probe.py"


@pytest.fixture(scope="module")
def probe() -> Any:
    spec = importlib.util.spec_from_file_location("label_probe", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_probe_separates_blobs_and_not_noise(probe: Any) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (3, 8))
    y = rng.integers(0, 3, 300)
    x = (centers[y] + rng.normal(0, 1, (300, 8))).astype(np.float32)
    _, pred = probe.linear_probe(x[:200], y[:200], x[200:], 3)
    assert (pred == y[200:]).mean() > 0.95
    noise_y = rng.integers(0, 3, 300)  # labels unrelated to x: held-out accuracy must stay near chance
    _, pred = probe.linear_probe(x[:200], noise_y[:200], x[200:], 3)
    assert (pred == noise_y[200:]).mean() < 0.55


def test_mask_features(probe: Any, tiny_sam: Any) -> None:
    image = np.zeros((120, 200, 3), np.uint8)
    image[20:60, 30:90] = (200, 100, 50)
    mask = np.zeros((120, 200), bool)
    mask[20:60, 30:90] = True
    pred = SamPredictor(tiny_sam)
    with torch.no_grad():
        pred.set_image(image)
        f = probe.mask_features(pred, image, mask)
    C = tiny_sam.prompt_encoder.embed_dim
    assert f["mask_tokens"].shape == (4 * C,) and f["pooled_embedding"].shape == (C,)
    np.testing.assert_allclose(f["color_shape"][:3], np.array([200, 100, 50]) / 255, atol=1e-4)
    np.testing.assert_allclose(f["color_shape"][3:6], 0, atol=1e-4)  # one flat colour
    area, aspect, cy, cx = f["color_shape"][6:]
    assert area == pytest.approx(40 * 60 / (120 * 200)) and aspect == pytest.approx(60 / 40)
    assert cy == pytest.approx(39.5 / 120) and cx == pytest.approx(59.5 / 200)
    # The pooled embedding is the mean of the embedding cells under the mask: a mask over other cells differs.
    other = np.zeros_like(mask)
    other[80:110, 120:190] = True
    assert not np.allclose(probe.mask_features(pred, image, other)["pooled_embedding"], f["pooled_embedding"])


def test_probes_the_shipped_weights_not_a_random_model(probe: Any) -> None:
    """The first published probe figures came from a random segany_tiny: build_sam without a checkpoint
    builds one. The script must resolve the shipped file itself, and the JSON names it by sha256."""
    from segany.hashing import file_digest

    path = probe._default_weights("segany_tiny")
    assert path is not None
    shipped = (Path(__file__).resolve().parents[2] / "src" / "segany" / "assets" / "weights"
               / "segany_tiny.pt.sha256").read_text().split()[0]
    assert file_digest(path) == shipped
