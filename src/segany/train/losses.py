"""Mask losses of SAM §3 "Losses": focal + dice (20:1) on masks, MSE on the IoU head."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss (Lin et al. 2017), mean over pixels. (N, H, W) → (N,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss. (N, H, W) → (N,)."""
    prob = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    inter = (prob * t).sum(1)
    return 1 - (2 * inter + eps) / (prob.sum(1) + t.sum(1) + eps)


def mask_iou(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded predictions (logit > 0) with bool/float targets. (N, H, W) → (N,)."""
    p = pred_logits > 0
    t = target > 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def mask_losses(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 20.0,
                dice_weight: float = 1.0) -> torch.Tensor:
    """Weighted focal + dice per mask, (N, H, W) → (N,)."""
    return focal_weight * focal_loss(logits, target) + dice_weight * dice_loss(logits, target)
