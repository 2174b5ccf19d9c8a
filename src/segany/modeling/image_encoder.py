"""ViT image encoder with windowed attention and decomposed relative positions (SAM §3, Li et al. ViTDet).

The image (B, 3, 1024, 1024) becomes 16×16 patches, passes through transformer blocks that attend
inside 14×14 windows except for a few global blocks, and a conv neck projects to the 256-channel
(B, 256, 64, 64) embedding the mask decoder reads.

Attention runs through ``scaled_dot_product_attention`` with the relative-position term passed as an
additive bias, so fused kernels are used where the backend has them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.config import ViTConfig
from segany.modeling.layers import LayerNorm2d, MLPBlock


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into non-overlapping windows (B·nW, window, window, C), zero-padding H and W up.

    Returns the windows and the padded (Hp, Wp); the argument names are the reference's.
    """
    window = window_size
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    window = window_size
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous() if (Hp, Wp) != (H, W) else x


def relative_position_table(q_len: int, k_len: int, table: torch.Tensor) -> torch.Tensor:
    """Gather per-offset embeddings (q_len, k_len, C) from a learned table of 2·max(q,k)−1 rows.

    A table trained for another size is linearly resampled, which lets a checkpoint run at a
    different input resolution.
    """
    rows = 2 * max(q_len, k_len) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.T[None], size=rows, mode="linear")[0].T
    q_scale, k_scale = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    q_pos = torch.arange(q_len, device=table.device)[:, None] * q_scale
    k_pos = torch.arange(k_len, device=table.device)[None, :] * k_scale
    offsets = (q_pos - k_pos) + (k_len - 1) * k_scale
    return table[offsets.long()]


def relative_position_bias(
    q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, hw: tuple[int, int],
    k_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Decomposed relative-position bias (MViTv2) for queries ``q`` (B, H·W, C) on an (H, W) grid against keys
    on a ``k_hw`` grid (default the same): returns (B, H·W, kH·kW)."""
    H, W = hw
    kH, kW = k_hw if k_hw is not None else hw
    rel_h = relative_position_table(H, kH, table_h)  # (H, kH, C)
    rel_w = relative_position_table(W, kW, table_w)  # (W, kW, C)
    B, _, C = q.shape
    q = q.reshape(B, H, W, C)
    bias_h = torch.einsum("bhwc,hkc->bhwk", q, rel_h)  # (B, H, W, kH)
    bias_w = torch.einsum("bhwc,wkc->bhwk", q, rel_w)  # (B, H, W, kW)
    bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]  # (B, H, W, kH, kW)
    return bias.reshape(B, H * W, kH * kW)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """The reference's name for :func:`relative_position_table`, kept for code that imports it."""
    return relative_position_table(q_size, k_size, rel_pos)


def add_decomposed_rel_pos(attn: torch.Tensor, q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
    """``attn`` (B, qh·qw, kh·kw) plus :func:`relative_position_bias` of queries ``q`` (B, qh·qw, C).

    The reference's function, for code that imports it. Returns a new tensor.
    """
    return attn + relative_position_bias(q, rel_pos_h, rel_pos_w, q_size, k_size)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with optional relative positions."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, self.head_dim))

    @property
    def scale(self) -> float:
        """The reference's attribute: the q·k scale, head_dim ** -0.5 (SDPA applies it itself)."""
        return self.head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh, L = self.num_heads, H * W
        qkv = self.qkv(x).reshape(B, L, 3, nh, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hd)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            # The bias uses the unscaled queries; SDPA scales only q·k.
            bias = relative_position_bias(q.reshape(B * nh, L, -1), self.rel_pos_h, self.rel_pos_w, (H, W))
            bias = bias.view(B, nh, L, L).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, L, hd)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; ``window`` > 0 restricts attention to local windows."""

    def __init__(self, cfg: ViTConfig, window: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        grid = (window, window) if window > 0 else (cfg.grid_size, cfg.grid_size)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.use_rel_pos, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))
        self.window = window

    @property
    def window_size(self) -> int:
        """The reference's name for ``window`` (0 for a global-attention block)."""
        return self.window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            H, W = x.shape[1:3]
            x, padded = window_partition(x, self.window)
            x = self.attn(x)
            x = window_unpartition(x, self.window, padded, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) → (B, H/p, W/p, C), channels last for the blocks."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT-B/L/H image encoder: (B, 3, S, S) normalized → (B, out_chans, S/16, S/16)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if cfg.use_abs_pos:
            g = cfg.grid_size
            self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.embed_dim))
        globals_ = set(cfg.global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(cfg, window=0 if i in globals_ else cfg.window_size) for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:  # another input size than trained for
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
            x = x + pos
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
