"""``segment_anything.automatic_mask_generator`` path: the generator lives in :mod:`segany.amg.generator`."""

from segany.amg.generator import SamAutomaticMaskGenerator

__all__ = ["SamAutomaticMaskGenerator"]
