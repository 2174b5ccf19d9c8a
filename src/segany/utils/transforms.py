"""``segment_anything.utils.transforms`` path: the class lives in :mod:`segany.transforms`."""

from segany.transforms import ResizeLongestSide

__all__ = ["ResizeLongestSide"]
