"""AdamW parameter groups (layer-wise lr decay, no decay on norms/biases/embeddings) and the lr schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from segany.modeling.config import TinyViTConfig, ViTConfig
from segany.train.config import OptimSection

_NO_DECAY = ("pos_embed", "rel_pos", "point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token",
             "mask_tokens", "attention_biases", "positional_encoding")


def encoder_layer_id(name: str, cfg: ViTConfig | TinyViTConfig) -> tuple[int, int]:
    """(layer id, number of layers) of an image-encoder parameter name (without ``image_encoder.``).

    The stem is layer 0, each transformer block one layer, the neck the last; lr scales as
    ``layer_decay ** (num_layers - id)`` so the neck trains at full lr and the stem at the least.
    """
    if isinstance(cfg, ViTConfig):
        n = cfg.depth + 1
        if name.startswith(("patch_embed", "pos_embed")):
            return 0, n
        m = re.match(r"blocks\.(\d+)\.", name)
        return (int(m.group(1)) + 1, n) if m else (n, n)
    depths = cfg.depths
    n = 1 + sum(depths[1:]) + 1
    if name.startswith("patch_embed"):
        return 0, n
    m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)", name)
    if not m:
        return n, n
    stage = int(m.group(1))
    if stage == 0:
        return 1, n
    offset = 1 + sum(depths[1:stage])
    return (offset + int(m.group(3)) + 1 if m.group(3) is not None else offset + depths[stage]), n


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """AdamW groups keyed by (lr scale, weight decay); frozen parameters are left out."""
    enc_cfg = model.cfg.encoder  # type: ignore[attr-defined]
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith("image_encoder.") and cfg.layer_decay < 1.0:
            lid, n = encoder_layer_id(name.removeprefix("image_encoder."), enc_cfg)
            scale = cfg.layer_decay ** (n - lid)
        wd = 0.0 if p.ndim <= 1 or any(k in name for k in _NO_DECAY) else cfg.weight_decay
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd, "lr": 0.0} for (s, wd), ps in sorted(groups.items())]


def lr_factor(step: int, progress: float, cfg: OptimSection) -> float:
    """Linear warmup over ``warmup_steps``, then ×``decay_gamma`` at each ``decay_at`` fraction of the run."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    drops = sum(1 for f in cfg.decay_at if progress >= f)
    return warm * math.pow(cfg.decay_gamma, drops)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_scale", 1.0) * factor
    return base_lr * factor
