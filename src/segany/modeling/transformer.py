"""Two-way transformer of the mask decoder (SAM §3 "Mask decoder", appendix A).

Prompt tokens and image tokens update each other: tokens self-attend, attend to the image, pass an
MLP, and the image attends back to the tokens. Positional encodings are re-added at every attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.layers import MLPBlock


class Attention(nn.Module):
    """Attention with separate q/k/v projections and an optional reduced inner width."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the inner width ({self.internal_dim})")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, N, c)

    # The reference's head helpers, for code that calls them; forward does not.
    def _separate_heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """(B, N, C) → (B, num_heads, N, C / num_heads)."""
        B, N, C = x.shape
        return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)

    def _recombine_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nh, N, c) → (B, N, nh·c)."""
        B, nh, N, c = x.shape
        return x.transpose(1, 2).reshape(B, N, nh * c)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        B, _, N, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, N, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int,
                 skip_first_layer_pe: bool, *, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:  # the first layer's queries already are the prompt encodings
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 activation: type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        # The reference's attributes, read by code that inspects the decoder.
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0,
                                 activation=activation)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) image, (B, C, H, W) its encoding, (B, N, C) tokens → tokens, image tokens (B, HW, C)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
