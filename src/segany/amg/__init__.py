"""Automatic mask generation ("segment everything"): config, grids, records, filters, generator."""

from segany.amg.config import AmgConfig
from segany.amg.generator import SamAutomaticMaskGenerator
from segany.amg.records import MaskRecords

__all__ = ["AmgConfig", "MaskRecords", "SamAutomaticMaskGenerator"]
