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
from segany.modeling.sam import Sam

__all__ = ["Sam", "SamConfig", "ViTConfig", "TinyViTConfig", "PromptEncoderConfig", "MaskDecoderConfig",
           "TextConfig", "ClassHeadConfig"]
