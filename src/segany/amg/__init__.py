"""Automatic mask generation ("segment everything"): config, grids, records, filters, generator.

The names are loaded on first use: the generator imports torch and torchvision (about 3 s on a 2-core
CPU), and the command line reads only :mod:`segany.amg.model_defaults` to build its ``--help``.
"""

from __future__ import annotations

from segany._lazy import lazy_getattr

_LAZY = {
    "AmgConfig": "segany.amg.config",
    "MaskRecords": "segany.amg.records",
    "SamAutomaticMaskGenerator": "segany.amg.generator",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr("segany.amg", _LAZY)
