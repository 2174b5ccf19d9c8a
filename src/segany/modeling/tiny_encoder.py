"""TinyViT image encoder, the light CPU-friendly encoder of MobileSAM (Zhang et al. 2023, Wu et al. 2022).

Layout: a stride-4 conv stem, one MBConv stage, then three stages of windowed attention with a
learned per-offset bias and a depthwise "local conv" after each attention. The last patch merging
keeps stride 1 so a 1024 px image still gives SAM's (B, 256, 64, 64) embedding. Parameter names
follow MobileSAM's checkpoint so ``mobile_sam.pt`` loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.config import TinyViTConfig
from segany.modeling.layers import LayerNorm2d


class Conv2dBN(nn.Sequential):
    """Conv without bias followed by BatchNorm; children named ``c`` and ``bn`` as in MobileSAM."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two stride-2 3×3 convs: (B, 3, S, S) → (B, C, S/4, S/4)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand, 3×3 depthwise, 1×1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Channel change plus (usually) 2× downsampling; token sequences in, token sequences out."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.act = nn.GELU()
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # (B, L, C) tokens → (B, C, H, W)
            r = self.resolution
            x = x.view(x.shape[0], r, r, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)  # (B, L', C')


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


def offset_index(window: int) -> torch.Tensor:
    """(n, n) id of the offset (|dy|, |dx|) between each pair of the n = window² cells, in row-major order.

    TinyViT numbers the offsets in the order they first appear over all (cell, cell) pairs; the pairs of the
    first cell (0, 0) already list every offset in row-major order, so that id is ``|dy| · window + |dx|``.
    Built with tensor ops on the CPU, then moved to the default device (a Python double loop took 50 ms per
    block of ViT-T; on the meta device these ops would import torch._dynamo, see ``layers.embedding``).
    """
    r = torch.arange(window, device="cpu")
    yx = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)  # (2, n), cells in row-major order
    d = (yx[:, :, None] - yx[:, None, :]).abs_()  # (2, n, n)
    return d[0].mul_(window).add_(d[1]).to(torch.empty(0).device)  # the default device (torch < 2.3 has no getter)


class WindowAttention(nn.Module):
    """Attention inside a window with a learned bias per (|dy|, |dx|) offset and head."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).view(B, N, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.split(self.key_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, nh, N, kd)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (nh, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class TinyMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention → depthwise local conv → MLP, on (B, H·W, C) tokens."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, mlp_ratio: float, local_k: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = TinyMlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_k, 1, local_k // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = W = self.resolution
        B, L, C = x.shape
        ws = self.window
        shortcut = x
        if H == ws and W == ws:
            x = self.attn(x)
        else:
            x = x.view(B, H, W, C)
            pad_b, pad_r = (-H) % ws, (-W) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            Hp, Wp = H + pad_b, W + pad_r
            nh, nw = Hp // ws, Wp // ws
            x = x.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
            x = self.attn(x)
            x = x.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
            x = x[:, :H, :W].reshape(B, L, C)
        x = shortcut + x
        x = x.transpose(1, 2).reshape(B, C, H, W)
        x = self.local_conv(x).view(B, C, L).transpose(1, 2)
        return x + self.mlp(x)


class AttnStage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 local_k: int, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio, local_k) for _ in range(depth)
        )
        self.downsample = downsample
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """MobileSAM's encoder: (B, 3, S, S) normalized → (B, out_chans, S/16, S/16)."""

    def __init__(self, cfg: TinyViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.img_size
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0])
        res0 = cfg.img_size // 4
        # Stage i works at res0 / 2**i, except the last, whose merging keeps stride 1 (MobileSAM).
        resolutions = [res0, res0 // 2, res0 // 4, res0 // 4]
        layers: list[nn.Module] = []
        for i, dim in enumerate(dims):
            last = i == len(dims) - 1
            down = None
            if not last:
                stride = 1 if i + 1 == len(dims) - 1 else 2
                down = PatchMerging(resolutions[i], dim, dims[i + 1], stride)
            if i == 0:
                layers.append(ConvStage(dim, cfg.depths[0], cfg.mbconv_expand_ratio, down))
            else:
                layers.append(AttnStage(dim, resolutions[i], cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i],
                                        cfg.mlp_ratio, cfg.local_conv_size, down))
        self.layers = nn.ModuleList(layers)
        # TinyViT's classifier head is unused by SAM but present in MobileSAM checkpoints.
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        g = self.cfg.grid_size
        B, _, C = x.shape
        return self.neck(x.view(B, g, g, C).permute(0, 3, 1, 2))
