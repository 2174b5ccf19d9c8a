"""``segment_anything.utils.amg`` path: the reference's public mask-generation helpers under their names.

Code written for the reference package imports these helpers to build its own generation loop
(point grids, crops, run-length encoding, stability scores). segany implements the same steps in
:mod:`segany.amg` and :mod:`segany.data.rle` under its own names; this module is a thin mapping
layer so that such code runs unchanged. Only the helpers segany has no equivalent for
(``MaskData``, ``batch_iterator``, ``box_xyxy_to_xywh`` and the ``uncrop_*`` functions) are
implemented here, in a few lines each. ``tests/parity/test_compat_api.py`` checks every name
against the reference on sample inputs.
"""

from __future__ import annotations

import copy
from collections.abc import ItemsView, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from segany.amg.filters import masks_to_boxes_xyxy, near_crop_edge, paste_crop, stability_scores
from segany.amg.grid import crop_boxes, layer_point_grids, point_grid
from segany.data.rle import NumpyRle, counts_area, counts_to_changes, counts_to_mask, encode_masks

__all__ = [
    "MaskData", "area_from_rle", "batch_iterator", "batched_mask_to_box", "box_xyxy_to_xywh",
    "build_all_layer_point_grids", "build_point_grid", "calculate_stability_score", "coco_encode_rle",
    "generate_crop_boxes", "is_box_near_crop_edge", "mask_to_rle_pytorch", "remove_small_regions",
    "rle_to_mask", "uncrop_boxes_xyxy", "uncrop_masks", "uncrop_points",
]

_BAG_TYPES = (list, np.ndarray, torch.Tensor)


def _check_bag_value(key: str, value: Any) -> None:
    if not isinstance(value, _BAG_TYPES):
        raise TypeError(f"MaskData[{key!r}] must be a list, numpy array or torch tensor, got {type(value).__name__}")


class MaskData:
    """A named bag of per-mask columns (lists, arrays or tensors) that are filtered and joined together.

    segany's generator keeps its records in :class:`segany.amg.records.MaskRecords` (typed device
    tensors); this class exists for code that drives the reference's generation loop by hand.
    """

    def __init__(self, **columns: Any) -> None:
        for key, value in columns.items():
            _check_bag_value(key, value)
        self._stats: dict[str, Any] = dict(columns)

    def __setitem__(self, key: str, item: Any) -> None:
        _check_bag_value(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the rows selected by ``keep`` (a bool mask or integer indices) in every column, in place."""
        for key, value in self._stats.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                self._stats[key] = value[torch.as_tensor(keep, device=value.device)]
            elif isinstance(value, np.ndarray):
                self._stats[key] = value[keep.detach().cpu().numpy()]
            elif isinstance(value, list):
                if keep.dtype == torch.bool:
                    self._stats[key] = [v for v, k in zip(value, keep.tolist(), strict=True) if k]
                else:
                    self._stats[key] = [value[int(i)] for i in keep]
            else:
                raise TypeError(f"MaskData[{key!r}] has unsupported type {type(value).__name__}")

    def cat(self, new_stats: MaskData) -> None:
        """Append ``new_stats``'s rows to each column (columns missing here are copied), in place."""
        for key, value in new_stats.items():
            mine = self._stats.get(key)
            if mine is None:
                self._stats[key] = copy.deepcopy(value)
            elif isinstance(value, torch.Tensor):
                self._stats[key] = torch.cat([mine, value], dim=0)
            elif isinstance(value, np.ndarray):
                self._stats[key] = np.concatenate([mine, value], axis=0)
            elif isinstance(value, list):
                self._stats[key] = mine + copy.deepcopy(value)
            else:
                raise TypeError(f"MaskData[{key!r}] has unsupported type {type(value).__name__}")

    def to_numpy(self) -> None:
        """Move every tensor column to a numpy array on the CPU, in place."""
        for key, value in self._stats.items():
            if isinstance(value, torch.Tensor):
                self._stats[key] = value.detach().cpu().numpy()


# ----------------------------------------------------------------- grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) cell-centre points (x, y) in [0, 1]; see :func:`segany.amg.grid.point_grid`."""
    return point_grid(n_per_side)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One point grid per crop layer 0..n_layers; see :func:`segany.amg.grid.layer_point_grids`."""
    return layer_point_grids(n_per_side, n_layers, scale_per_layer)


def generate_crop_boxes(im_size: tuple[int, ...], n_layers: int, overlap_ratio: float
                        ) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY) over all layers and their layer indices; see :func:`segany.amg.grid.crop_boxes`."""
    return crop_boxes((int(im_size[0]), int(im_size[1])), n_layers, overlap_ratio)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    """Shift (..., 4) XYXY boxes from a crop's frame to the image frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    """Shift (..., 2) XY points from a crop's frame to the image frame."""
    return points + torch.tensor([crop_box[0], crop_box[1]], device=points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pad (..., h, w) crop masks to the (orig_h, orig_w) image at the crop's position."""
    return paste_crop(masks, crop_box, (orig_h, orig_w))


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
                          ) -> torch.Tensor:
    """(N,) bool: a box edge near a crop edge that is not an image edge; see :func:`segany.amg.filters.near_crop_edge`."""
    return near_crop_edge(boxes, crop_box, orig_box, atol=atol)


# ----------------------------------------------------------------- boxes and scores
def box_xyxy_to_xywh(box_xyxy: torch.Tensor) -> torch.Tensor:
    """XYXY → XYWH on the last dimension (a (4,) box or (N, 4) boxes); the input is not modified.

    The reference converts a single (4,) box; for (N, 4) input it would subtract rows instead.
    """
    box_xywh = box_xyxy.clone()
    box_xywh[..., 2] = box_xyxy[..., 2] - box_xyxy[..., 0]
    box_xywh[..., 3] = box_xyxy[..., 3] - box_xyxy[..., 1]
    return box_xywh


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive max) of (..., H, W) masks, shape (..., 4); empty masks give zeros.

    See :func:`segany.amg.filters.masks_to_boxes_xyxy`, which this reshapes around.
    """
    lead = masks.shape[:-2]
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, device=masks.device)
    h, w = masks.shape[-2:]
    boxes = masks_to_boxes_xyxy(masks.reshape(-1, h, w) != 0)
    return boxes.to(torch.promote_types(masks.dtype, torch.int64)).reshape(*lead, 4)


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU of the masks at ``mask_threshold ± threshold_offset``; see :func:`segany.amg.filters.stability_scores`."""
    return stability_scores(masks, mask_threshold, threshold_offset)


# ----------------------------------------------------------------- run-length encoding
def mask_to_rle_pytorch(tensor: torch.Tensor) -> list[dict[str, Any]]:
    """(N, H, W) bool masks → uncompressed COCO RLEs ``{"size": [H, W], "counts": [...]}``."""
    rles = encode_masks(tensor).to_numpy()
    return [rles.uncompressed(i) for i in range(len(rles))]


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed COCO RLE → (H, W) bool mask."""
    return counts_to_mask(rle["counts"], rle["size"])


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixels of an uncompressed COCO RLE."""
    return counts_area(rle["counts"])


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed COCO RLE → compressed (``counts`` as str, JSON-ready); needs pycocotools."""
    h, w = (int(v) for v in uncompressed_rle["size"])
    changes, first = counts_to_changes(uncompressed_rle["counts"])
    one = NumpyRle(changes, np.array([0, len(changes)]), np.array([first]), (h, w))
    return one.to_coco()[0]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh`` pixels.

    Returns the mask and whether it changed. Needs OpenCV (as segany's generator does).
    """
    from segany.amg.postprocess import _drop_islands, _fill_holes

    if mode == "holes":
        return _fill_holes(mask, area_thresh)  # type: ignore[arg-type]
    if mode == "islands":
        return _drop_islands(mask, area_thresh)  # type: ignore[arg-type]
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Iterator[list[Any]]:
    """Yield ``[a[i:i + batch_size] for a in args]`` over equal-length sequences; the last batch may be short."""
    if not args:
        raise ValueError("batch_iterator needs at least one sequence to batch")
    n = len(args[0])
    lengths = [len(a) for a in args]
    if any(length != n for length in lengths):
        raise ValueError(f"batch_iterator needs sequences of one length, got lengths {lengths}")
    for start in range(0, n, batch_size):
        yield [a[start:start + batch_size] for a in args]
