"""segany: promptable image segmentation in the line of Segment Anything.

Switch from the reference package by changing ``segment_anything`` to ``segany`` in imports:
``sam_model_registry``, ``SamPredictor`` and ``SamAutomaticMaskGenerator`` keep their names and
signatures.
"""

from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    # Lazy so `import segany` stays cheap (the CLI starts fast) and free of side effects.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segany' has no attribute {name!r}")
