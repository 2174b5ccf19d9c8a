"""segany: promptable image segmentation in the line of Segment Anything.

Switch from the reference package by changing ``segment_anything`` to ``segany`` in imports:
``sam_model_registry``, ``SamPredictor`` and ``SamAutomaticMaskGenerator`` keep their names and
signatures.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from segany._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "Sam": "segany.modeling.sam",
    "SamConfig": "segany.modeling.config",
    "SamPredictor": "segany.predictor",
    "SamAutomaticMaskGenerator": "segany.amg.generator",
    "build_sam": "segany.checkpoints",
    "save_checkpoint": "segany.checkpoints",
    "download": "segany.checkpoints",
    "list_models": "segany.registry",
    "create_model": "segany.compat",
    "sam_model_registry": "segany.compat",
    "build_sam_vit_h": "segany.compat",
    "build_sam_vit_l": "segany.compat",
    "build_sam_vit_b": "segany.compat",
    "build_sam_vit_t": "segany.compat",
    "ResizeLongestSide": "segany.transforms",
}

__all__ = sorted(_LAZY)


# Submodules the reference package imports itself, so `segment_anything.utils.transforms` works after a
# bare `import segment_anything`; here they load on first use (`build_sam` stays the function, see below).
_SUBMODULES = ("modeling", "utils", "predictor", "automatic_mask_generator")

# Lazy so `import segany` stays cheap (the CLI starts fast) and free of side effects.
_names = lazy_getattr("segany", _LAZY)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"segany.{name}")
    return _names(name)


class _Package(types.ModuleType):
    """segany's module type: keeps ``segany.build_sam`` the builder function, as the reference package does.

    ``segany.build_sam`` is also the name of a submodule (the ``segment_anything.build_sam`` path).
    Importing a submodule binds it on its package, which would silently turn ``from segany import
    build_sam`` into the module; that one binding is refused here, so the name stays the function
    whichever import runs first, and ``from segany.build_sam import sam_model_registry`` still works.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "build_sam" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
