"""Prompt encoder + mask decoder as one ONNX graph, for decoding clicks in the browser.

The graph takes the image embedding the server computed plus prompts, so only the light decoder
runs per click (SAM §3: "a prompt → mask in ~50 ms in a web browser"). Inputs and outputs follow
the layout SAM's ONNX demo popularised, so other SAM front ends can drive it:

===================  ==================  =====================================================
input                shape / dtype       meaning
===================  ==================  =====================================================
image_embeddings     (1, C, g, g) f32    from ``GET /api/images/{id}/embedding``
point_coords         (1, N, 2) f32       (x, y) in the *resized* model frame (long side =
                                         ``img_size``); box corners are two points
point_labels         (1, N) f32          1 fg, 0 bg, 2 box top-left, 3 box bottom-right,
                                         -1 padding (add one ``(0, 0), -1`` point without a box)
mask_input           (1, 1, 4g, 4g) f32  low-res logits from a previous decode
has_mask_input       (1,) f32            1 to use ``mask_input``, else 0
orig_im_size         (2,) f32            original (H, W)
===================  ==================  =====================================================

Outputs: ``masks`` (1, 3, H, W) logits at the original size (threshold at 0), ``iou_predictions``
(1, 3) and ``low_res_masks`` (1, 3, 4g, 4g). The three masks are the multimask outputs.

Until the project-wide ``segany export onnx`` lands, the server exports with this module.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segany.atomic import atomic_path
from segany.modeling.sam import Sam

log = logging.getLogger(__name__)

INPUT_NAMES = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]


class PromptDecoderGraph(nn.Module):
    """Traceable prompt → mask path of a :class:`Sam` (no Python branching on prompt kinds)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.img_size = sam.img_size
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def _point_tokens(self, coords_xy: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        # Same encoding as PromptEncoder: pixel centres (+0.5) normalised by the square model frame.
        unit = (coords_xy + 0.5) / self.img_size
        proj = 2 * math.pi * ((2 * unit - 1) @ pe.pe_layer.positional_encoding_gaussian_matrix)
        emb = torch.cat([proj.sin(), proj.cos()], dim=-1)
        lab = labels.unsqueeze(-1)
        emb = torch.where(lab == -1, pe.not_a_point_embed.weight.expand_as(emb), emb)
        for value in range(4):
            emb = emb + (lab == value).to(emb.dtype) * pe.point_embeddings[value].weight
        return emb

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        sparse = self._point_tokens(point_coords, point_labels)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        masks, iou = self.mask_decoder.predict_masks(image_embeddings, self.dense_pe, sparse, dense)
        low_res, iou = masks[:, 1:], iou[:, 1:]
        s = self.img_size
        up = F.interpolate(low_res, size=(s, s), mode="bilinear", align_corners=False)
        # Undo resize-longest-side: crop the padding, then resize to the original size.
        scale = s / orig_im_size.max()
        in_hw = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
        up = up[..., : in_hw[0], : in_hw[1]]
        out_hw = orig_im_size.to(torch.int64)
        full = F.interpolate(up, size=(out_hw[0], out_hw[1]), mode="bilinear", align_corners=False)
        return full, iou, low_res


def example_inputs(sam: Sam, n_points: int = 3) -> tuple[torch.Tensor, ...]:
    g = sam.cfg.embed_size
    c = sam.cfg.decoder.transformer_dim
    return (
        torch.randn(1, c, g, g),
        torch.randint(0, sam.img_size, (1, n_points, 2)).float(),
        torch.tensor([[1.0] * (n_points - 1) + [-1.0]]),
        torch.zeros(1, 1, 4 * g, 4 * g),
        torch.zeros(1),
        torch.tensor([float(sam.img_size) * 0.75, float(sam.img_size)]),
    )


def export_decoder_onnx(sam: Sam, path: str | os.PathLike[str], *, opset: int = 17) -> Path:
    """Write the prompt decoder of ``sam`` to ``path`` (atomically) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = PromptDecoderGraph(sam).to("cpu").eval()
    for p in graph.parameters():
        p.requires_grad_(False)
    with atomic_path(out) as tmp, torch.no_grad():
        torch.onnx.export(
            graph, example_inputs(sam), str(tmp), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                          "masks": {2: "height", 3: "width"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return out
