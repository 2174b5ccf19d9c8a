"""``segment_anything.utils`` import paths, for code written against the reference package.

Each submodule maps the reference's names onto segany's own implementations; nothing new lives
here except where segany had no equivalent:

- :mod:`segany.utils.transforms`: ``ResizeLongestSide`` (from :mod:`segany.transforms`)
- :mod:`segany.utils.amg`: the mask-generation helpers (from :mod:`segany.amg` and :mod:`segany.data.rle`)
- :mod:`segany.utils.onnx`: ``SamOnnxModel``, the single-graph ONNX decoder of SAM's export notebook

See docs/compat.md for what maps where and the known differences.
"""

from typing import Any

_SUBMODULES = ("amg", "onnx", "transforms")


def __getattr__(name: str) -> Any:
    """``segany.utils.transforms`` and the others load on first use, as after ``import segment_anything``
    (whose predictor imports them) they are simply there."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"segany.utils.{name}")
    raise AttributeError(f"module 'segany.utils' has no attribute {name!r}")
