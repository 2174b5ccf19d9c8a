"""The Segment Anything network: image encoders, prompt encoder and mask decoder (tensors only)."""

from segany.modeling.config import (
    ClassHeadConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    TextConfig,
    TinyViTConfig,
    ViTConfig,
)
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.sam import Sam
from segany.modeling.transformer import TwoWayTransformer

# The reference's part classes are exported under its names. Sam, ImageEncoderViT and MaskDecoder take
# segany config objects (SamConfig, ViTConfig, MaskDecoderConfig) instead of the reference's keyword
# lists; PromptEncoder and TwoWayTransformer take the reference's keywords. See docs/compat.md.
__all__ = ["Sam", "ImageEncoderViT", "PromptEncoder", "MaskDecoder", "TwoWayTransformer", "SamConfig", "ViTConfig",
           "TinyViTConfig", "PromptEncoderConfig", "MaskDecoderConfig", "TextConfig", "ClassHeadConfig"]
