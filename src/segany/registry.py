"""Model and weights registries.

A model variant is a registered function returning a :class:`SamConfig`; a weights entry says
where a checkpoint for a variant comes from and how to check it. Registering a name twice raises,
and unknown names suggest close matches, so a typo never silently picks another model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from segany.errors import SeganyError, UnknownModelError
from segany.modeling.config import SamConfig


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build_config: Callable[[], SamConfig]
    weights: str | None
    description: str


@dataclass(frozen=True)
class WeightsInfo:
    """A downloadable checkpoint.

    ``sha256`` is checked after download when known; ``md5`` covers official files whose publisher
    states only the MD5 (SAM's file names carry its first 6 hex digits). ``layout`` is the key
    layout of the file: ``sam`` (official), ``mobile_sam``, ``hf`` (Hugging Face) or ``segany``.
    """

    name: str
    model: str
    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    layout: str = "sam"
    description: str = ""


_MODELS: dict[str, ModelInfo] = {}
_WEIGHTS: dict[str, WeightsInfo] = {}


def _unknown(kind: str, name: str, known: list[str]) -> UnknownModelError:
    by_lower = {k.lower(): k for k in known}  # "VIT_B" should still suggest vit_b
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.4)]
    hint = f"; did you mean {', '.join(close)}?" if close else "."
    return UnknownModelError(f"unknown {kind} {name!r}{hint} Known: {', '.join(sorted(known))}")


def register_model(name: str, *, weights: str | None = None, description: str = ""
                   ) -> Callable[[Callable[[], SamConfig]], Callable[[], SamConfig]]:
    """Decorator registering a config function under ``name``."""

    def wrap(fn: Callable[[], SamConfig]) -> Callable[[], SamConfig]:
        if name in _MODELS:
            raise SeganyError(f"model {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, fn, weights, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def register_weights(info: WeightsInfo) -> WeightsInfo:
    if info.name in _WEIGHTS:
        raise SeganyError(f"weights {info.name!r} are already registered")
    _WEIGHTS[info.name] = info
    return info


def _ensure_loaded() -> None:
    # Variants and weights register on import of these modules; importing here keeps
    # `segany.registry` free of import cycles with the modeling package.
    import segany.modeling.variants  # noqa: F401
    import segany.text.label_model  # noqa: F401  (segany_tiny_labels: a shipped class head over segany_tiny)
    import segany.weights  # noqa: F401


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def get_model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name == "default":
        name = "vit_h"
    if name not in _MODELS:
        raise _unknown("model", name, list(_MODELS))
    return _MODELS[name]


def get_config(name: str) -> SamConfig:
    return get_model_info(name).build_config()


def list_weights() -> list[str]:
    _ensure_loaded()
    return sorted(_WEIGHTS)


def get_weights_info(name: str) -> WeightsInfo:
    _ensure_loaded()
    if name not in _WEIGHTS:
        raise _unknown("weights", name, list(_WEIGHTS))
    return _WEIGHTS[name]


def weights_for_model(model: str) -> WeightsInfo | None:
    info = get_model_info(model)
    return get_weights_info(info.weights) if info.weights else None
