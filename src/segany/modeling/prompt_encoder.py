"""Prompt encoder (SAM §3 "Prompt encoder"): points and boxes become sparse tokens, masks a dense map.

Coordinates are (x, y) pixels in the *resized* model-input frame (longest side = ``img_size``).
Point labels: 1 foreground, 0 background, -1 padding ("not a point"); 2/3 are box corners in the ONNX
graphs only (see ``_embed_points``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from segany.modeling.layers import LayerNorm2d, embedding, reference_keywords


class RandomFourierEncoding(nn.Module):
    """Positional encoding by a fixed random Gaussian projection (Tancik et al. 2020).

    The matrix is a buffer, not a parameter: it is part of the checkpoint but never trained.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float | None = 1.0) -> None:
        super().__init__()
        if scale is None or scale <= 0:  # the reference's rule: no (or a non-positive) scale means 1
            scale = 1.0
        # In place: an out-of-place scalar op on the meta device imports torch._dynamo (see layers.embedding).
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats).mul_(scale))

    def _encode(self, coords01: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] → (..., 2·num_pos_feats)."""
        proj = (2 * coords01 - 1) @ self.positional_encoding_gaussian_matrix.to(coords01.dtype)
        proj = 2 * math.pi * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """The reference's name for :meth:`_encode` (its ONNX wrapper calls it)."""
        return self._encode(coords)

    @reference_keywords(size="size_hw")
    def forward(self, size_hw: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an H×W grid of cell centres: (C, H, W). ``size=`` (the reference's name) also works."""
        h, w = size_hw
        m = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
        xs = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    @reference_keywords(coords_input="points_xy", image_size="image_size_hw")
    def forward_with_coords(self, points_xy: torch.Tensor, image_size_hw: tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates (..., 2) given the frame size (H, W).

        The reference's keywords ``coords_input`` and ``image_size`` also work.
        """
        h, w = image_size_hw
        # Divide by Python scalars, not a tensor made from them: torch.tensor copies from host memory, which a
        # CUDA-graph capture of the prompt encoder refuses. The fp32 quotients are the same.
        xy = points_xy.float()
        return self._encode(torch.stack((xy[..., 0] / w, xy[..., 1] / h), dim=-1))


# Kept under the reference's name so code that pokes at the encoder still finds it.
PositionEmbeddingRandom = RandomFourierEncoding


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
                 mask_in_chans: int = 16, activation: type[nn.Module] = nn.GELU, text_dim: int = 0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = RandomFourierEncoding(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        c = mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            activation(),
            nn.Conv2d(c // 4, c, kernel_size=2, stride=2),
            LayerNorm2d(c),
            activation(),
            nn.Conv2d(c, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = embedding(1, embed_dim)
        # Optional CLIP prompt token (SAM §7.5): only built when asked, so SAM checkpoints load strictly.
        self.text_dim = text_dim
        if text_dim > 0:
            self.text_proj = nn.Linear(text_dim, embed_dim)
            self.text_type_embed = embedding(1, embed_dim)

    def embed_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) CLIP embeddings (text or image, L2-normalized) → (B, 1, C) prompt tokens."""
        if self.text_dim <= 0:
            raise ValueError("this prompt encoder has no text token (built with text_dim=0)")
        tok = self.text_proj(text_embeddings.to(self.text_proj.weight.dtype)) + self.text_type_embed.weight
        return tok[:, None]

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, C, H, W)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    @reference_keywords(points="points_xy")
    def _embed_points(self, points_xy: torch.Tensor, labels: torch.Tensor, pad: bool, corners: bool = True
                      ) -> torch.Tensor:
        """Point tokens. ``corners``: labels 2/3 get the box-corner embeddings, as in SAM's ONNX decoder
        (segany's ONNX graphs and label training send boxes that way). :meth:`forward` passes False: there,
        as in the reference package, 2/3 are left with their positional encoding only. The reference's method
        has no ``corners`` and leaves 2/3 alone; pass ``corners=False`` for its result on such labels.
        ``points=`` (the reference's name for ``points_xy``) also works."""
        points_xy = points_xy + 0.5  # pixel centres
        if pad:  # without a box the decoder expects one padding token after the points
            B = points_xy.shape[0]
            points_xy = torch.cat([points_xy, points_xy.new_zeros(B, 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(B, 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points_xy, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.to(emb.dtype).expand_as(emb), emb)
        for value in (0, 1, 2, 3) if corners else (0, 1):
            emb = emb + (lab == value).to(emb.dtype) * self.point_embeddings[value].weight.to(emb.dtype)
        return emb

    @reference_keywords(boxes="boxes_xyxy")
    def _embed_boxes(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """(B, 4) XYXY boxes → (B, 2, C) corner tokens. ``boxes=`` (the reference's name) also works."""
        corners = (boxes_xyxy + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_tokens = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_tokens.to(emb.dtype)

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4h, 4w) low-res mask logits → (B, C, h, w) dense embeddings."""
        return self.mask_downscaling(masks)

    def _get_batch_size(self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None,
                        masks: torch.Tensor | None, text_embeddings: torch.Tensor | None = None) -> int:
        """The number of prompts B: from the first prompt given, in argument order; 1 if none is."""
        if points is not None:
            return points[0].shape[0]
        for prompt in (boxes, masks, text_embeddings):
            if prompt is not None:
                return prompt.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        text_embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: ``(coords (B, N, 2), labels (B, N))`` in model-input pixels, or None.
            boxes: (B, 4) XYXY in model-input pixels, or None.
            masks: (B, 1, 256, 256) low-res mask logits, or None.
            text_embeddings: (B, D) CLIP embeddings, one extra token each (needs ``text_dim`` > 0), or None.

        Returns:
            sparse (B, N', C) tokens and dense (B, C, 64, 64) embeddings.
        """
        B = self._get_batch_size(points, boxes, masks, text_embeddings)
        parts = [torch.empty(B, 0, self.embed_dim, device=self._get_device())]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None, corners=False))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if text_embeddings is not None:
            parts.append(self.embed_text(text_embeddings))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, h, w)
        return sparse, dense
