"""Model/weights registries and the ``segment_anything``-style drop-in names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import segany
from segany import registry
from segany.checkpoints import save_checkpoint
from segany.compat import build_sam_vit_b, build_sam_vit_h, build_sam_vit_t, sam_model_registry
from segany.errors import CheckpointError, SeganyError, UnknownModelError
from segany.modeling.config import SamConfig
from segany.modeling.sam import Sam
from segany.registry import (
    WeightsInfo,
    get_config,
    get_model_info,
    list_models,
    register_model,
    register_weights,
)


def test_official_variants_are_registered() -> None:
    assert {"vit_b", "vit_l", "vit_h", "vit_t"} <= set(list_models())
    assert get_config("default") == get_config("vit_h")
    assert get_config("vit_b").encoder.embed_dim == 768
    assert registry.weights_for_model("vit_b").filename == "sam_vit_b_01ec64.pth"  # type: ignore[union-attr]


def test_duplicate_model_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    registry._ensure_loaded()
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # undo whatever this test registers
    with pytest.raises(SeganyError, match="'vit_b' is already registered"):
        register_model("vit_b")(lambda: SamConfig())
    register_model("test_once")(tiny_config)
    with pytest.raises(SeganyError, match="already registered"):
        register_model("test_once")(tiny_config)


def test_duplicate_weights_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    registry._ensure_loaded()
    monkeypatch.setattr(registry, "_WEIGHTS", dict(registry._WEIGHTS))
    with pytest.raises(SeganyError, match="'sam_vit_b' are already registered"):
        register_weights(WeightsInfo(name="sam_vit_b", model="vit_b", url="https://x", filename="x.pth"))


@pytest.mark.parametrize(("typo", "suggestion"), [("vit_bb", "vit_b"), ("vith", "vit_h"), ("VIT_L", "vit_l")])
def test_unknown_model_suggests_close_names(typo: str, suggestion: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model_info(typo)
    msg = str(info.value)
    assert f"unknown model {typo!r}" in msg and "did you mean" in msg and suggestion in msg
    assert not msg.startswith('"'), "KeyError quoting must not leak into the message"


def test_unknown_weights_suggest_close_names() -> None:
    with pytest.raises(UnknownModelError, match="did you mean sam_vit_b"):
        registry.get_weights_info("sam_vit_bb")


def test_sam_model_registry_drop_in(tmp_path: Path) -> None:
    assert {"default", "vit_h", "vit_l", "vit_b", "vit_t"} <= set(sam_model_registry)
    assert len(sam_model_registry) == len(list_models()) + 1
    assert sam_model_registry["default"].__name__ == "build_sam_vit_h" == build_sam_vit_h.__name__
    with pytest.raises(KeyError, match="did you mean vit_b"):
        sam_model_registry["vit_bx"]
    # Same call shape as segment_anything: registry[name](checkpoint=path), here with MobileSAM's vit_t (small).
    model = Sam(get_config("vit_t"))
    path = save_checkpoint(model, tmp_path / "vit_t.pt")
    for build in (sam_model_registry["vit_t"], build_sam_vit_t, segany.sam_model_registry["vit_t"]):
        loaded = build(checkpoint=str(path))
        assert isinstance(loaded, Sam) and not loaded.training
        assert torch.equal(loaded.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    # As the reference's strict load would, vit_b refuses a ViT built otherwise, naming what differs.
    tiny = save_checkpoint(Sam(tiny_config()), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"ViT encoder built unlike 'vit_b''s: img_size 256 \(not 1024\), "
                                              r"embed_dim 96 \(not 768\)"):
        build_sam_vit_b(checkpoint=str(tiny))


def test_package_exports_drop_in_names() -> None:
    from segany import SamPredictor, build_sam, sam_model_registry  # noqa: F401

    for name in segany.__all__:
        if name == "SamAutomaticMaskGenerator":
            continue  # owned by the automatic-mask area; may land later
        assert getattr(segany, name) is not None
    with pytest.raises(AttributeError):
        segany.not_a_name  # noqa: B018
