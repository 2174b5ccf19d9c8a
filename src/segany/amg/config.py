"""Options of automatic mask generation (SAM §7.1 / appendix B "automatic mask generation").

The names and defaults are those of the reference ``SamAutomaticMaskGenerator``, so code that
passes keyword arguments to it works unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from segany.errors import InputError

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass(frozen=True)
class AmgConfig:
    """Grid, thresholds and crops of one automatic-mask run.

    Attributes:
        points_per_side: a regular grid of this many points per side is prompted per crop; None
            when ``point_grids`` is given instead.
        points_per_batch: prompts decoded together (memory vs. speed).
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 keeps all).
        stability_score_thresh: keep masks whose stability score is at least this (0 keeps all).
        stability_score_offset: logit offset of the two thresholds the stability score compares.
        box_nms_thresh: box IoU above which NMS drops the lower-scored mask, within a crop.
        crop_n_layers: extra layers of crops; layer i has (2**i)**2 crops.
        crop_nms_thresh: box NMS threshold across crops.
        crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the shorter image side
            at the first crop layer.
        crop_n_points_downscale_factor: the grid of layer i has points_per_side / factor**i points.
        point_grids: explicit grids in [0, 1] (x, y), one (N, 2) array per crop layer.
        min_mask_region_area: fill holes and drop islands smaller than this many pixels (0: off).
        output_mode: ``binary_mask``, ``uncompressed_rle`` or ``coco_rle``.
    """

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    point_grids: tuple[np.ndarray, ...] | None = field(default=None, compare=False)
    min_mask_region_area: int = 0
    output_mode: str = "binary_mask"

    def __post_init__(self) -> None:
        if (self.points_per_side is None) == (self.point_grids is None):
            raise InputError("give exactly one of points_per_side and point_grids, got "
                             f"points_per_side={self.points_per_side!r} and point_grids="
                             f"{'None' if self.point_grids is None else f'{len(self.point_grids)} grids'}")
        if self.points_per_side is not None and int(self.points_per_side) < 1:
            raise InputError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if int(self.points_per_batch) < 1:
            raise InputError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if int(self.crop_n_layers) < 0:
            raise InputError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if int(self.crop_n_points_downscale_factor) < 1:
            raise InputError(f"crop_n_points_downscale_factor must be >= 1, got {self.crop_n_points_downscale_factor}")
        if self.points_per_side is not None:
            factor, layers = int(self.crop_n_points_downscale_factor), int(self.crop_n_layers)
            if int(int(self.points_per_side) / factor ** layers) < 1:
                raise InputError(
                    f"crop layer {layers} would get no points: points_per_side={self.points_per_side} divided by "
                    f"crop_n_points_downscale_factor**{layers}={factor ** layers} is below 1; raise points_per_side "
                    "to at least that, or lower crop_n_layers or crop_n_points_downscale_factor")
        if not 0.0 <= float(self.crop_overlap_ratio) < 1.0:
            raise InputError(f"crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio}")
        for name in ("box_nms_thresh", "crop_nms_thresh"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {v}")
        if float(self.stability_score_offset) < 0:
            raise InputError(f"stability_score_offset must be >= 0, got {self.stability_score_offset}")
        if int(self.min_mask_region_area) < 0:
            raise InputError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
        if self.output_mode not in OUTPUT_MODES:
            raise InputError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {self.output_mode!r}")
        if self.point_grids is not None:
            grids = tuple(np.asarray(g, dtype=np.float64) for g in self.point_grids)
            if len(grids) != self.crop_n_layers + 1:
                raise InputError(f"point_grids needs one grid per crop layer ({self.crop_n_layers + 1}), got "
                                 f"{len(grids)}")
            for i, g in enumerate(grids):
                if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0:
                    raise InputError(f"point_grids[{i}] must have shape (N, 2) with N >= 1, got {g.shape}")
                if not np.isfinite(g).all() or g.min() < 0 or g.max() > 1:
                    raise InputError(f"point_grids[{i}] must hold (x, y) in [0, 1] (fractions of the crop size)")
            object.__setattr__(self, "point_grids", grids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (grids as nested lists)."""
        d = asdict(self)
        if self.point_grids is not None:
            d["point_grids"] = [g.tolist() for g in self.point_grids]
        return d
