"""``segment_anything.utils`` import paths, for code written against the reference package.

Each submodule maps the reference's names onto segany's own implementations; nothing new lives
here except where segany had no equivalent:

- :mod:`segany.utils.transforms`: ``ResizeLongestSide`` (from :mod:`segany.transforms`)
- :mod:`segany.utils.amg`: the mask-generation helpers (from :mod:`segany.amg` and :mod:`segany.data.rle`)
- :mod:`segany.utils.onnx`: ``SamOnnxModel``, the single-graph ONNX decoder of SAM's export notebook

See docs/compat.md for what maps where and the known differences.
"""
