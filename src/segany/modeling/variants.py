"""Named architectures. Each variant is a function returning a :class:`SamConfig`, registered by name.

Sizes follow the SAM paper (ViT-B/L/H) and MobileSAM (vit_t); ``segany_tiny`` is the light model
segany trains itself. Tests build their own small config (``tiny_config`` in tests/conftest.py).
"""

from __future__ import annotations

from segany.modeling.config import SamConfig, TinyViTConfig, ViTConfig
from segany.registry import register_model


@register_model("vit_h", weights="sam_vit_h", description="SAM ViT-H (632M encoder), best quality")
def vit_h() -> SamConfig:
    return SamConfig(encoder=ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)))


@register_model("vit_l", weights="sam_vit_l", description="SAM ViT-L (307M encoder)")
def vit_l() -> SamConfig:
    return SamConfig(encoder=ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)))


@register_model("vit_b", weights="sam_vit_b", description="SAM ViT-B (91M encoder), fastest official SAM")
def vit_b() -> SamConfig:
    return SamConfig(encoder=ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)))


@register_model("vit_t", weights="mobile_sam", description="MobileSAM TinyViT (5.7M encoder), for CPUs")
def vit_t() -> SamConfig:
    return SamConfig(encoder=TinyViTConfig())


@register_model("segany_tiny", weights="segany_tiny",
                description="segany's own light model (TinyViT, 512 px), trained on open data; the default")
def segany_tiny() -> SamConfig:
    # Stage windows fit the 512 px grid exactly (128/64/32/32 tokens a side), and the unused
    # ImageNet classifier head of TinyViT is dropped (num_classes=0).
    return SamConfig(encoder=TinyViTConfig(img_size=512, window_sizes=(8, 8, 16, 8), num_classes=0))
