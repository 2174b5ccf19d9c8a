"""Automatic mask generation ("segment everything"): config, grids, records, filters, generator.

The names are loaded on first use: the generator imports torch and torchvision (about 3 s on a 2-core
CPU), and the command line reads only :mod:`segany.amg.model_defaults` to build its ``--help``.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "AmgConfig": "segany.amg.config",
    "MaskRecords": "segany.amg.records",
    "SamAutomaticMaskGenerator": "segany.amg.generator",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segany.amg' has no attribute {name!r}")
