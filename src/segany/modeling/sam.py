"""The assembled Segment Anything model plus its image pre- and post-processing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.class_head import ClassHead
from segany.modeling.config import SamConfig, TinyViTConfig
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.tiny_encoder import TinyViT


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder.

    Built from a :class:`SamConfig`; the config travels with checkpoints that segany writes.
    Pixel statistics are non-persistent buffers, so official checkpoints (which lack them) load strictly.
    """

    image_format: str = "RGB"

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_threshold = cfg.mask_threshold
        enc = cfg.encoder
        self.image_encoder: nn.Module = TinyViT(enc) if isinstance(enc, TinyViTConfig) else ImageEncoderViT(enc)
        g = cfg.embed_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt.embed_dim, image_embedding_size=(g, g),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.prompt.mask_in_chans,
            text_dim=cfg.text.clip_dim if cfg.text is not None else 0,
        )
        self.mask_decoder = MaskDecoder(cfg.decoder)
        # Optional (issue 10): absent unless the config asks, so SAM's state dict is unchanged.
        self.class_head: ClassHead | None = (ClassHead(cfg.classes, cfg.decoder.transformer_dim)
                                             if cfg.classes is not None else None)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize (…, 3, h, w) RGB in 0–255 and zero-pad bottom/right to ``img_size`` square."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
                          ) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) → logits at the original image size (B, C, H, W).

        Upsample to the padded model frame, drop the padding, then resize to the original size.
        """
        s = self.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction with the reference's batched-input interface.

        Each item holds ``image`` (3, h, w) already resized so its long side is ``img_size``,
        ``original_size`` (H, W), and optionally ``point_coords`` (B, N, 2), ``point_labels`` (B, N),
        ``boxes`` (B, 4) and ``mask_inputs`` (B, 1, 256, 256), all in the resized frame, and
        ``text_embeddings`` (B, D) CLIP embeddings for a model with a text token.
        """
        images = torch.stack([self.preprocess(item["image"]) for item in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for item, emb in zip(batched_input, embeddings, strict=True):
            points = (item["point_coords"], item["point_labels"]) if "point_coords" in item else None
            sparse, dense = self.prompt_encoder(points, item.get("boxes"), item.get("mask_inputs"),
                                                item.get("text_embeddings"))
            low_res, iou = self.mask_decoder(emb[None], self.prompt_encoder.get_dense_pe(), sparse, dense,
                                             multimask_output)
            masks = self.postprocess_masks(low_res, tuple(item["image"].shape[-2:]), tuple(item["original_size"]))
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs
