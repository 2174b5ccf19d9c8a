"""``segment_anything``-style names as a read-only view of segany's registry."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import torch

from segany.checkpoints import build_sam
from segany.modeling.sam import Sam
from segany.registry import get_model_info, list_models

Builder = Callable[..., Sam]


def create_model(name: str, checkpoint: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> Sam:
    return build_sam(name, checkpoint=checkpoint, device=device)


def _builder(name: str) -> Builder:
    def build(checkpoint: str | os.PathLike[str] | None = None) -> Sam:
        return build_sam(name, checkpoint=checkpoint)

    build.__name__ = f"build_sam_{name}"
    return build


class _Registry(Mapping[str, Builder]):
    """Mapping of model names to builders, like ``segment_anything.sam_model_registry``.

    Reads go through the live registry, so variants registered later appear here too.
    """

    def __getitem__(self, name: str) -> Builder:
        get_model_info(name)  # raises with suggestions for unknown names
        return _builder("vit_h" if name == "default" else name)

    def __iter__(self) -> Iterator[str]:
        return iter(["default", *list_models()])

    def __len__(self) -> int:
        return len(list_models()) + 1


sam_model_registry = _Registry()
build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_t = _builder("vit_t")
build_sam_default = build_sam_vit_h
