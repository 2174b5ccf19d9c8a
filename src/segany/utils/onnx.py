"""``segment_anything.utils.onnx`` path: ``SamOnnxModel``, the prompt-to-mask graph of SAM's ONNX export notebook.

The notebook wraps a model in ``SamOnnxModel``, exports it with ``torch.onnx.export`` (a dynamic
number of points) and runs it in ONNX Runtime with six inputs. This class takes a segany
:class:`~segany.modeling.sam.Sam` and keeps that contract, so the notebook runs unchanged:

inputs
    ``image_embeddings`` (B, 256, g, g); ``point_coords`` (B, N, 2) XY in the resized model frame
    (``ResizeLongestSide.apply_coords``); ``point_labels`` (B, N): 1 foreground, 0 background,
    2/3 box top-left/bottom-right, -1 padding; ``mask_input`` (B, 1, 4g, 4g) low-res logits;
    ``has_mask_input`` (1,) 1 or 0; ``orig_im_size`` (2,) as (H, W).
outputs
    ``masks`` (B, K, H, W) logits at the original size, ``scores`` (B, K) predicted IoU (or stability
    scores with ``use_stability_score``), ``low_res_masks`` (B, K, 4g, 4g). K is all 4 decoder masks,
    or 1 with ``return_single_mask``: the best multimask output by score when the prompt has at most 2
    points counting padding and box corners (one click plus its padding, or a box alone), otherwise
    the single-mask output. ``return_extra_metrics`` returns
    ``(masks, scores, stability_scores, areas, low_res_masks)`` instead.

Prompt embedding, mask blending and upscaling come from :class:`segany.export.onnx.DecoderGraph`
(segany's own decoder graph); only the mask choice and the optional scores differ from it.
"""

from __future__ import annotations

import torch

from segany.amg.filters import stability_scores
from segany.export.onnx import DecoderGraph, pick_mask
from segany.modeling.sam import Sam

__all__ = ["SamOnnxModel"]


class SamOnnxModel(DecoderGraph):
    """Prompt encoder, mask decoder and mask upscaling of a segany ``Sam`` in one traceable module.

    Meant for ``torch.onnx.export`` (the legacy tracing exporter, ``dynamo=False``), as in SAM's notebook.
    """

    def __init__(self, model: Sam, return_single_mask: bool, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> None:
        super().__init__(model, multimask=not return_single_mask)
        self.mask_decoder = model.mask_decoder
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0
        self.return_extra_metrics = return_extra_metrics

    @staticmethod
    def resize_longest_image_size(input_image_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """(H, W) scaled so the longer side is ``longest_side``, rounded half up, as int64 (traceable)."""
        size = input_image_size.to(torch.float32)
        return torch.floor(size * (longest_side / torch.max(size)) + 0.5).to(torch.int64)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits (B, K, 4g, 4g) → (B, K, H, W) at ``orig_im_size``: upsample, unpad, resize."""
        return self._upscale(masks, orig_im_size)

    def select_masks(self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: torch.Tensor | int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt: the single-mask output (index 0) for 3+ points, else the best of the others.

        Args:
            masks: (B, K, h, w) logits of all K mask tokens.
            iou_preds: (B, K) their scores (predicted IoU, or stability scores).
            num_points: prompt points per row, padding and box corners included (an int or a (B,) tensor).

        Returns:
            (B, 1, h, w) masks and (B, 1) scores.

        Branch-free so that it traces: output 0's score is shifted by ±1000·(num_points − 2.5), which puts
        it above every other score for 3+ points and below them for up to 2.
        """
        shift = torch.tensor([1000.0] + [0.0] * (iou_preds.shape[1] - 1), dtype=iou_preds.dtype,
                             device=iou_preds.device)
        n = torch.as_tensor(num_points, dtype=iou_preds.dtype, device=iou_preds.device).reshape(-1, 1)
        best = (iou_preds + (n - 2.5) * shift).argmax(dim=1)  # (B,)
        return pick_mask(masks, iou_preds, best)

    @torch.no_grad()
    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        # Labels 2/3 get the box-corner embeddings and -1 the padding embedding; no padding is added.
        low_res, scores = self._decode(image_embeddings, self._sparse(point_coords, point_labels), mask_input,
                                       has_mask_input)
        threshold = self.model.mask_threshold
        if self.use_stability_score:
            scores = stability_scores(low_res, threshold, self.stability_score_offset)
        if self.return_single_mask:
            # The count of all N prompt points (padding included), kept in the graph so N stays dynamic.
            num_points = torch.ones_like(point_labels).sum(dim=1)
            low_res, scores = self.select_masks(low_res, scores, num_points)
        masks = self.mask_postprocessing(low_res, orig_im_size)
        if self.return_extra_metrics:
            stability = stability_scores(masks, threshold, self.stability_score_offset)
            areas = (masks > threshold).sum(dim=(-1, -2))
            return masks, scores, stability, areas, low_res
        return masks, scores, low_res
