"""``segment_anything``-style names as a view of segany's registry, plus builders users add themselves."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, MutableMapping

import torch

from segany.checkpoints import build_sam
from segany.errors import CheckpointError, InputError, UnknownModelError
from segany.modeling.sam import Sam
from segany.registry import get_config, get_model_info, list_models

Builder = Callable[..., Sam]


def create_model(name: str, checkpoint: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> Sam:
    return build_sam(name, checkpoint=checkpoint, device=device)


def _builder(name: str) -> Builder:
    def build(checkpoint: str | os.PathLike[str] | None = None) -> Sam:
        model = build_sam(name, checkpoint=checkpoint)
        _check_kind(model, name, checkpoint)
        return model

    build.__name__ = f"build_sam_{name}"
    return build


def _check_kind(model: Sam, name: str, checkpoint: str | os.PathLike[str] | None) -> None:
    """``sam_model_registry["vit_b"](checkpoint=f)`` must give a ViT-B model, as the reference's strict load
    ensures. A segany file carries its own config, which ``build_sam`` follows (the CLI relies on that); here
    the name was asked for explicitly, so an encoder of another architecture is refused: another kind
    (TinyViT for ViT), or the same kind built otherwise (segany_tiny's 512 px TinyViT for ``vit_t``, whose
    weights the reference could not load strictly either). Fine-tuned weights of the named model pass."""
    wanted_cfg = get_config(name).encoder
    got_cfg = model.cfg.encoder
    if got_cfg == wanted_cfg:
        return
    wanted, got = type(wanted_cfg), type(got_cfg)
    same = [m for m in list_models() if get_config(m).encoder == got_cfg]
    hint = f"sam_model_registry[{same[0]!r}]" if same else "segany.build_sam(path)"
    if got is not wanted:
        what = f"a {got.__name__.removesuffix('Config')} model, not {name!r} ({wanted.__name__.removesuffix('Config')})"
    else:
        diff = [f"{f} {getattr(got_cfg, f)!r} (not {getattr(wanted_cfg, f)!r})" for f in got.__dataclass_fields__
                if getattr(got_cfg, f) != getattr(wanted_cfg, f)]
        what = f"a {got.__name__.removesuffix('Config')} encoder built unlike {name!r}'s: {', '.join(diff)}"
    raise CheckpointError(f"checkpoint {str(checkpoint)!r} holds {what}: use {hint}, which reads the variant "
                          "from the file")


class _Registry(MutableMapping[str, Builder]):
    """Mapping of model names to builders, like ``segment_anything.sam_model_registry``.

    Reads of registered names go through the live registry, so variants registered later appear here
    too. As with the reference's dict, users may add their own builders
    (``sam_model_registry["mine"] = fn`` or ``.update(...)``); those take priority over a registered
    name of the same spelling and are the only entries that can be deleted. To make a variant
    known to the whole library (CLI, ``create_model``), register it with ``segany.registry`` instead.
    """

    def __init__(self) -> None:
        self._user: dict[str, Builder] = {}

    def __getitem__(self, name: str) -> Builder:
        if name in self._user:
            return self._user[name]
        get_model_info(name)  # raises with suggestions for unknown names
        return _builder("vit_h" if name == "default" else name)

    def __setitem__(self, name: str, builder: Builder) -> None:
        if not isinstance(name, str):
            raise InputError(f"sam_model_registry keys are model names (str), got {type(name).__name__}")
        if not callable(builder):
            raise InputError(f"sam_model_registry[{name!r}] must be a builder function (checkpoint=None) -> Sam, "
                            f"got {type(builder).__name__}")
        self._user[name] = builder

    def __delitem__(self, name: str) -> None:
        if name not in self._user:
            raise UnknownModelError(f"{name!r} is not a builder added to sam_model_registry; registered models cannot "
                           "be removed, only builders assigned with sam_model_registry[name] = fn")
        del self._user[name]

    def __iter__(self) -> Iterator[str]:
        names = ["default", *list_models()]
        return iter(names + [n for n in self._user if n not in names])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def clear(self) -> None:
        """Remove the user-added builders; registered models stay."""
        self._user.clear()


sam_model_registry = _Registry()
build_sam_vit_h = _builder("vit_h")
build_sam_vit_l = _builder("vit_l")
build_sam_vit_b = _builder("vit_b")
build_sam_vit_t = _builder("vit_t")
build_sam_default = build_sam_vit_h
