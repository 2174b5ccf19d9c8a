"""The reference's ``segment_anything.modeling.common`` path: its two layers, which segany keeps in
:mod:`segany.modeling.layers`. Only here so that code importing the old path runs unchanged."""

from segany.modeling.layers import LayerNorm2d, MLPBlock

__all__ = ["LayerNorm2d", "MLPBlock"]
