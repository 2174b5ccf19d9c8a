"""Key layout and shapes match the reference checkpoints, so official files load with strict=True.

ViT-L/H and the full ``vit_t`` are compared on torch's meta device: shapes without memory or compute,
so CI checks every official layout without building a 2.5 GB model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from sam_oracle import randomize_realistic_, reference_mobile_sam, reference_sam, require_oracle

from segany.modeling.sam import Sam
from segany.registry import get_config

pytestmark = pytest.mark.parity


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _assert_same_layout(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = _shapes(ours), _shapes(ref)
    assert sorted(set(b) - set(a)) == [], "keys the reference has and segany lacks"
    assert sorted(set(a) - set(b)) == [], "keys segany has and the reference lacks"
    wrong = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert wrong == {}


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_vit_layout_on_meta(name: str) -> None:
    sam = require_oracle("segment_anything", "segment-anything==1.0")
    with torch.device("meta"):
        ref = sam.sam_model_registry[name]()
        ours = Sam(get_config(name))
    _assert_same_layout(ours, ref)
    # The official files (e.g. sam_vit_h_4b8939.pth) hold exactly these keys: meta tensors load strictly too.
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)


def test_mobile_sam_layout() -> None:
    # On CPU, not meta: MobileSAM's builder calls .item() on a tensor; the model is only 10M parameters.
    ms = require_oracle("mobile_sam", "mobilesam-mirror==1.0.0 timm")
    ref = ms.sam_model_registry["vit_t"]()
    _assert_same_layout(Sam(get_config("vit_t")), ref)


def test_tiny_state_dict_round_trips_strictly() -> None:
    ref = randomize_realistic_(reference_sam(tiny_config()), seed=1)
    ours = Sam(tiny_config())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = reference_sam(tiny_config())
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_vit_t_state_dict_round_trips_strictly() -> None:
    cfg = get_config("vit_t")
    ref = randomize_realistic_(reference_mobile_sam(cfg), seed=1)
    ours = Sam(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = reference_mobile_sam(cfg)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_pixel_statistics_are_not_checkpoint_keys() -> None:
    # The reference keeps pixel_mean/std out of its files; if ours were persistent, official
    # checkpoints would fail strict loading with two "missing" keys.
    assert not {"pixel_mean", "pixel_std"} & set(Sam(tiny_config()).state_dict())
