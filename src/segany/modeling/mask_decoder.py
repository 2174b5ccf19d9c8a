"""Mask decoder (SAM §3): an IoU token and 4 mask tokens run through the two-way transformer; the
image tokens are upscaled 4×, and a per-token hypernetwork MLP turns each mask token into the
weights of a dot product with the upscaled features. Token 0 is the single-mask output, tokens
1–3 the three masks for ambiguous prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from segany.modeling.config import MaskDecoderConfig
from segany.modeling.layers import MLP, LayerNorm2d, embedding, reference_keywords
from segany.modeling.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    def __init__(self, cfg: MaskDecoderConfig) -> None:
        super().__init__()
        d = cfg.transformer_dim
        self.transformer_dim = d
        self.transformer = TwoWayTransformer(
            depth=cfg.transformer_depth, embedding_dim=d, num_heads=cfg.transformer_heads,
            mlp_dim=cfg.transformer_mlp_dim, attention_downsample_rate=cfg.attention_downsample_rate,
        )
        self.num_multimask_outputs = cfg.num_multimask_outputs
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = embedding(1, d)
        self.mask_tokens = embedding(self.num_mask_tokens, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(d, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for B prompts.

        Args:
            image_embeddings: (1, C, h, w) shared by all prompts, or (B, C, h, w) one per prompt.
            image_pe: (1, C, h, w) positional encoding.
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B, C, h, w).
            multimask_output: return the 3 ambiguity masks instead of the single one.

        Returns:
            low-res mask logits (B, 3 or 1, 4h, 4w) and predicted IoU (B, 3 or 1).
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                        dense_prompt_embeddings)[:2]
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]

    @reference_keywords(sparse_prompt_embeddings="sparse", dense_prompt_embeddings="dense")
    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor, return_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        """All 4 masks and IoU predictions, before choosing single or multimask output.

        With ``return_tokens`` also the (B, 4, C) output mask tokens (what a class head reads). The reference's
        keywords ``sparse_prompt_embeddings`` and ``dense_prompt_embeddings`` also work.
        """
        B = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).to(sparse.dtype)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(B, -1, -1), sparse], dim=1)
        if image_embeddings.shape[0] == B:
            src = image_embeddings + dense
        else:  # one image embedding shared by B prompts
            src = image_embeddings.expand(B, -1, -1, -1) + dense
        pos = image_pe.expand(B, -1, -1, -1)
        _, C, h, w = src.shape
        hs, src_tokens = self.transformer(src, pos, tokens)
        iou_out = hs[:, 0]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.output_upscaling(src_tokens.transpose(1, 2).reshape(B, C, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, c, H, W = up.shape
        masks = (hyper @ up.view(B, c, H * W)).view(B, -1, H, W)
        if return_tokens:
            return masks, self.iou_prediction_head(iou_out), mask_out
        return masks, self.iou_prediction_head(iou_out)
