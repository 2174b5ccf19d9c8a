"""Prompt simulation for training (SAM §3 "Training algorithm"), on the model's device.

All coordinates are (x, y) pixels in the model-input frame. Random draws use an explicit
``torch.Generator`` so a resumed run draws the same prompts.
"""

from __future__ import annotations

import torch


def sample_points(region: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One point drawn uniformly from each (N, H, W) bool region.

    Returns (points_xy (N, 2) float, found (N,) bool); rows whose region is empty get (0, 0), found=False.
    """
    N, H, W = region.shape
    scores = torch.rand((N, H * W), generator=gen, device=region.device) + 1.0
    scores = scores * region.flatten(1)  # 0 outside the region, in [1, 2) inside
    flat = scores.argmax(1)
    found = region.flatten(1).any(1)
    xy = torch.stack([flat % W, flat // W], dim=1).float()
    return xy, found


def mask_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) boxes of (N, H, W) bool masks (zeros for empty masks)."""
    N, H, W = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(H, device=masks.device)
    ar_w = torch.arange(W, device=masks.device)
    y0 = torch.where(rows, ar_h, H).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, W).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(masks.flatten(1).any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def jitter_boxes(boxes: torch.Tensor, frame: int, gen: torch.Generator, noise: float = 0.1,
                 noise_max: float = 20.0) -> torch.Tensor:
    """Add Gaussian noise of std ``noise`` × side (capped at ``noise_max`` px) to each coordinate."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    std = torch.stack([w, h, w, h], 1) * noise
    std = std.clamp(max=noise_max)
    out = boxes + torch.randn(boxes.shape, generator=gen, device=boxes.device) * std
    out = out.clamp(0, frame - 1)
    x0, x1 = torch.minimum(out[:, 0], out[:, 2]), torch.maximum(out[:, 0], out[:, 2])
    y0, y1 = torch.minimum(out[:, 1], out[:, 3]), torch.maximum(out[:, 1], out[:, 3])
    return torch.stack([x0, y0, x1, y1], 1)


def error_points(pred: torch.Tensor, gt: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next corrective click: uniform over the error region of each prediction.

    Args:
        pred, gt: (N, H, W) bool.

    Returns:
        points_xy (N, 2) and labels (N,): 1 for a false-negative pixel (add), 0 for false-positive
        (remove), -1 (a padding "not a point") where the prediction is already perfect.
    """
    fn = gt & ~pred
    fp = pred & ~gt
    xy, found = sample_points(fn | fp, gen)
    x = xy[:, 0].long()
    y = xy[:, 1].long()
    idx = torch.arange(len(gt), device=gt.device)
    positive = fn[idx, y, x]
    labels = torch.where(positive, 1, 0)
    labels = torch.where(found, labels, -1)
    return xy, labels
