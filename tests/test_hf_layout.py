"""Hugging Face ``transformers.SamModel`` key layout: our names map to HF's and back, through a real file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config
from safetensors.torch import save_file

from segany import hf_layout, registry
from segany.checkpoints import build_sam, read_checkpoint
from segany.modeling.sam import Sam
from segany.registry import ModelInfo, get_config

# Names as they appear in HF's published SAM checkpoints (facebook/sam-vit-base, model.safetensors).
KNOWN_HF_KEYS = [
    "vision_encoder.patch_embed.projection.weight",
    "vision_encoder.pos_embed",
    "vision_encoder.layers.0.layer_norm1.weight",
    "vision_encoder.layers.0.attn.qkv.weight",
    "vision_encoder.layers.0.attn.rel_pos_h",
    "vision_encoder.layers.1.mlp.lin2.bias",
    "vision_encoder.neck.conv1.weight",
    "vision_encoder.neck.layer_norm2.bias",
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.point_embed.0.weight",
    "prompt_encoder.not_a_point_embed.weight",
    "prompt_encoder.no_mask_embed.weight",
    "prompt_encoder.mask_embed.conv1.weight",
    "prompt_encoder.mask_embed.layer_norm2.weight",
    "prompt_encoder.mask_embed.conv3.bias",
    "mask_decoder.iou_token.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.upscale_conv1.weight",
    "mask_decoder.upscale_layer_norm.weight",
    "mask_decoder.upscale_conv2.bias",
    "mask_decoder.iou_prediction_head.proj_in.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
    "mask_decoder.iou_prediction_head.proj_out.bias",
    "mask_decoder.output_hypernetworks_mlps.3.proj_out.weight",
    "mask_decoder.transformer.layers.0.layer_norm1.weight",
    "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight",
    "mask_decoder.transformer.layer_norm_final_attn.weight",
]


@pytest.fixture
def tiny_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the tiny config for this test only (build_sam takes a name; the registry is global)."""
    registry._ensure_loaded()
    monkeypatch.setitem(registry._MODELS, "test_tiny_hf", ModelInfo("test_tiny_hf", tiny_config, None, "test"))
    return "test_tiny_hf"


def test_known_hf_names(tiny_sam: Sam) -> None:
    hf = hf_layout.to_hf(tiny_sam.state_dict())
    missing = [k for k in KNOWN_HF_KEYS if k not in hf]
    assert missing == []
    # No segany/official name may leak into the HF dict.
    leaked = [k for k in hf if k.startswith("image_encoder.") or ".blocks." in k or ".norm1." in k
              or "output_upscaling" in k or "mask_downscaling" in k or "point_embeddings" in k]
    assert leaked == []
    assert hf_layout.is_hf(hf) and not hf_layout.is_hf(tiny_sam.state_dict())
    assert torch.equal(hf["shared_image_embedding.positional_embedding"],
                       tiny_sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)


def test_from_hf_inverts_to_hf_for_every_registered_model() -> None:
    for name in registry.list_models():
        with torch.device("meta"):
            sd = Sam(get_config(name)).state_dict()
        back = hf_layout.from_hf(hf_layout.to_hf(sd))
        assert sorted(back) == sorted(sd), name


@pytest.mark.parametrize("tied_copy", [True, False])
def test_safetensors_round_trip_through_build_sam(tmp_path: Path, tiny_name: str, tied_copy: bool) -> None:
    model = randomize_(Sam(tiny_config()), seed=5)
    hf = {k: v.contiguous() for k, v in hf_layout.to_hf(model.state_dict()).items()}
    if not tied_copy:  # HF ties the prompt encoder's copy to shared_image_embedding and may save it once
        del hf["prompt_encoder.shared_embedding.positional_embedding"]
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    loaded = build_sam(tiny_name, checkpoint=path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # A folder holding model.safetensors (the HF snapshot layout) is accepted too.
    assert sorted(read_checkpoint(tmp_path)[0]) == sorted(model.state_dict())


def test_tinyvit_hf_style_round_trip(tmp_path: Path) -> None:
    # TinyViT's stages are named "layers" like HF's ViT blocks; the inverse map must not confuse them.
    model = Sam(get_config("vit_t"))
    path = tmp_path / "mobile.safetensors"
    save_file({k: v.contiguous() for k, v in hf_layout.to_hf(model.state_dict()).items()}, str(path))
    loaded = build_sam("vit_t", checkpoint=path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
