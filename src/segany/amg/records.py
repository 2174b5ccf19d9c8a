"""The masks of one image while they are generated: a dataclass of device tensors.

Every field has the same first dimension N; filtering and concatenating act on all fields at
once, so nothing is converted between numpy, lists and tensors until the output edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from segany.data.rle import RleBatch


@dataclass(frozen=True)
class MaskRecords:
    """N candidate masks, all in the original-image frame.

    Attributes:
        rles: column-major run-length encodings of the (H, W) masks.
        iou_preds: (N,) float32 predicted IoU.
        stability: (N,) float32 stability score.
        points_xy: (N, 2) float64 prompt point, original-image pixels.
        boxes_xyxy: (N, 4) int64 mask bounding box, inclusive max (x1, y1 are the last pixel).
        crop_boxes_xyxy: (N, 4) int64 crop each mask came from (end-exclusive).
        areas: (N,) int64 foreground pixels.
    """

    rles: RleBatch
    iou_preds: torch.Tensor
    stability: torch.Tensor
    points_xy: torch.Tensor
    boxes_xyxy: torch.Tensor
    crop_boxes_xyxy: torch.Tensor
    areas: torch.Tensor

    def __len__(self) -> int:
        return int(self.iou_preds.shape[0])

    def select(self, index: torch.Tensor) -> MaskRecords:
        """Records at ``index`` (int64 indices, e.g. NMS output order, or a bool mask)."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return MaskRecords(
            rles=self.rles.select(index),
            iou_preds=self.iou_preds[index],
            stability=self.stability[index],
            points_xy=self.points_xy[index],
            boxes_xyxy=self.boxes_xyxy[index],
            crop_boxes_xyxy=self.crop_boxes_xyxy[index],
            areas=self.areas[index],
        )

    @staticmethod
    def cat(parts: Sequence[MaskRecords]) -> MaskRecords:
        if len(parts) == 1:
            return parts[0]
        return MaskRecords(
            rles=RleBatch.cat([p.rles for p in parts]),
            iou_preds=torch.cat([p.iou_preds for p in parts]),
            stability=torch.cat([p.stability for p in parts]),
            points_xy=torch.cat([p.points_xy for p in parts]),
            boxes_xyxy=torch.cat([p.boxes_xyxy for p in parts]),
            crop_boxes_xyxy=torch.cat([p.crop_boxes_xyxy for p in parts]),
            areas=torch.cat([p.areas for p in parts]),
        )

    @staticmethod
    def empty(size_hw: tuple[int, int], device: torch.device | str) -> MaskRecords:
        f = torch.zeros(0, dtype=torch.float32, device=device)
        i4 = torch.zeros(0, 4, dtype=torch.int64, device=device)
        return MaskRecords(RleBatch.empty(size_hw, device), f, f.clone(),
                           torch.zeros(0, 2, dtype=torch.float64, device=device), i4, i4.clone(),
                           torch.zeros(0, dtype=torch.int64, device=device))
