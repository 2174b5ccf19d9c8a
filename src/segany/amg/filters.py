"""Batched per-mask measurements and filters of automatic mask generation, in torch.

All functions take a batch of masks (N, H, W) and run on the tensors' device.
"""

from __future__ import annotations

import torch


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at ``mask_threshold ± offset`` (SAM §7.1), (N,) float32.

    The high-threshold mask is inside the low-threshold one, so the IoU is a ratio of pixel counts.
    An empty low-threshold mask gives NaN (0/0), as in the reference.
    """
    inner = (logits > (mask_threshold + offset)).sum(dim=(-1, -2))
    outer = (logits > (mask_threshold - offset)).sum(dim=(-1, -2))
    return inner.to(torch.float32) / outer.to(torch.float32)


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes (N, 4) int64 of (N, H, W) bool masks, inclusive max; empty masks give zeros."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    # argmax returns the first maximal index: the first occupied row/column from either end.
    top = rows.to(torch.uint8).argmax(dim=1)
    bottom = (h - 1) - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = (w - 1) - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1).to(torch.int64)
    return boxes * rows.any(dim=1, keepdim=True)


def near_crop_edge(boxes_xyxy: torch.Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0
                   ) -> torch.Tensor:
    """(N,) bool: a box edge lies within ``atol`` px of a crop edge that is not an image edge.

    Such masks are probably cut by the crop and a neighbouring crop sees the whole object.
    ``boxes_xyxy`` are in the crop frame; crop and image boxes in the original frame.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes_xyxy.device)
    image = torch.as_tensor(image_box, dtype=torch.float32, device=boxes_xyxy.device)
    offset = torch.as_tensor([crop_box[0], crop_box[1], crop_box[0], crop_box[1]], device=boxes_xyxy.device)
    boxes = (boxes_xyxy + offset).to(torch.float32)
    at_crop = (boxes - crop[None]).abs() <= atol
    at_image = (boxes - image[None]).abs() <= atol
    return (at_crop & ~at_image).any(dim=1)


def paste_crop(masks: torch.Tensor, crop_box: list[int], size_hw: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) masks of the crop ``crop_box`` (XYXY) → (..., H, W) masks of the whole image, zero
    outside the crop (returned as they are when the crop is the whole image)."""
    x0, y0, x1, y1 = crop_box
    h, w = size_hw
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return masks
    return torch.nn.functional.pad(masks, (x0, w - x1, y0, h - y1), value=0)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
