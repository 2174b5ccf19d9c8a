"""Key map between segany/official SAM names and Hugging Face ``transformers.SamModel`` names.

The map is a list of (ours, theirs) regex rewrites applied in order; loading applies the inverse.
HF stores the random-Fourier matrix twice (``shared_image_embedding`` and the prompt encoder's
tied copy); we read either and write both.
"""

from __future__ import annotations

import re

import torch

# Order matters: the specific rewrites run before the generic ".norm" → ".layer_norm".
_OURS_TO_HF: list[tuple[str, str]] = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"\.output_hypernetworks_mlps\.(\d+)\.layers\.0\.", r".output_hypernetworks_mlps.\1.proj_in."),
    (r"\.output_hypernetworks_mlps\.(\d+)\.layers\.1\.", r".output_hypernetworks_mlps.\1.layers.0."),
    (r"\.output_hypernetworks_mlps\.(\d+)\.layers\.2\.", r".output_hypernetworks_mlps.\1.proj_out."),
    (r"\.iou_prediction_head\.layers\.0\.", ".iou_prediction_head.proj_in."),
    (r"\.iou_prediction_head\.layers\.1\.", ".iou_prediction_head.layers.0."),
    (r"\.iou_prediction_head\.layers\.2\.", ".iou_prediction_head.proj_out."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
    (r"\.norm(\d|_final_attn)", r".layer_norm\1"),
]
_SHARED_PE = "shared_image_embedding.positional_embedding"
_PROMPT_PE = "prompt_encoder.shared_embedding.positional_embedding"


def _rewrite(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a segany/official state dict to HF ``SamModel`` names."""
    out = {_rewrite(k, _OURS_TO_HF): v for k, v in state_dict.items()}
    if _PROMPT_PE in out:
        out[_SHARED_PE] = out[_PROMPT_PE].clone()  # a shared storage would make safetensors' save_file refuse
    return out


def _inverse_rules() -> list[tuple[str, str]]:
    # Hand-written inverses: regex rewrites are not mechanically invertible in general.
    return [
        (r"^vision_encoder\.", "image_encoder."),
        # ViT blocks only: TinyViT's stages are also called layers (``layers.N.blocks.M``/``.downsample``).
        (r"^image_encoder\.layers\.(?=\d+\.(?!blocks\.|downsample\.))", "image_encoder.blocks."),
        (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
        (r"\.neck\.conv1\.", ".neck.0."),
        (r"\.neck\.layer_norm1\.", ".neck.1."),
        (r"\.neck\.conv2\.", ".neck.2."),
        (r"\.neck\.layer_norm2\.", ".neck.3."),
        (r"\.output_hypernetworks_mlps\.(\d+)\.layers\.0\.", r".output_hypernetworks_mlps.\1.layers.1."),
        (r"\.output_hypernetworks_mlps\.(\d+)\.proj_in\.", r".output_hypernetworks_mlps.\1.layers.0."),
        (r"\.output_hypernetworks_mlps\.(\d+)\.proj_out\.", r".output_hypernetworks_mlps.\1.layers.2."),
        (r"\.iou_prediction_head\.layers\.0\.", ".iou_prediction_head.layers.1."),
        (r"\.iou_prediction_head\.proj_in\.", ".iou_prediction_head.layers.0."),
        (r"\.iou_prediction_head\.proj_out\.", ".iou_prediction_head.layers.2."),
        (r"\.upscale_conv1\.", ".output_upscaling.0."),
        (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
        (r"\.upscale_conv2\.", ".output_upscaling.3."),
        (r"\.mask_embed\.conv1\.", ".mask_downscaling.0."),
        (r"\.mask_embed\.layer_norm1\.", ".mask_downscaling.1."),
        (r"\.mask_embed\.conv2\.", ".mask_downscaling.3."),
        (r"\.mask_embed\.layer_norm2\.", ".mask_downscaling.4."),
        (r"\.mask_embed\.conv3\.", ".mask_downscaling.6."),
        (r"\.point_embed\.", ".point_embeddings."),
        (r"\.shared_embedding\.positional_embedding$", ".pe_layer.positional_encoding_gaussian_matrix"),
        (r"\.layer_norm(\d|_final_attn)", r".norm\1"),
    ]


def is_hf(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("vision_encoder.") for k in state_dict)


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF ``SamModel`` state dict to segany/official names."""
    sd = dict(state_dict)
    shared = sd.pop(_SHARED_PE, None)
    if shared is not None and _PROMPT_PE not in sd:
        sd[_PROMPT_PE] = shared
    rules = _inverse_rules()
    return {_rewrite(k, rules): v for k, v in sd.items()}
