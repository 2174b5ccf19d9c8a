"""Automatic mask generation, "segment everything" (SAM §7.1 and appendix B).

Prompt the model with a regular grid of points over the image (and optionally over overlapping
crops), keep masks with a high predicted IoU and a stable threshold, drop duplicates with box NMS,
and optionally clean small holes and islands.

A drop-in for ``segment_anything.SamAutomaticMaskGenerator``: same constructor arguments and the
same output records. Every per-mask step up to NMS runs batched on the model's device
(thresholds, stability scores, boxes, NMS, uncropping and run-length encoding); the CPU only
turns the surviving run-length encodings into the requested output format at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from segany import cpu_alloc
from segany.amg.config import AmgConfig
from segany.amg.filters import box_area, masks_to_boxes_xyxy, near_crop_edge, paste_crop, stability_scores
from segany.amg.grid import crop_boxes, layer_point_grids
from segany.amg.nms import single_class_nms
from segany.amg.records import MaskRecords
from segany.data.images import to_rgb_uint8
from segany.data.rle import (
    NumpyRle,
    RleBatch,
    counts_area,
    counts_to_changes,
    counts_to_mask,
    decode_masks_torch,
    encode_masks,
    mask_to_counts,
)
from segany.errors import InputError
from segany.modeling.sam import Sam
from segany.predictor import SamPredictor

log = logging.getLogger(__name__)


def _nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    # One category for all masks: what the reference's batched_nms call gives, ties broken alike.
    return single_class_nms(boxes_xyxy.float(), scores, iou_thresh)


# Full-size logits of one CPU batch: kept under glibc's largest mmap threshold (32 MiB, which segany.cpu_alloc
# sets), with an eighth to spare, so their buffers are reused between batches instead of being mapped and
# faulted in afresh.
CPU_LOGITS_BUDGET_BYTES = cpu_alloc.MMAP_THRESHOLD_BYTES * 7 // 8  # 28 MiB
CPU_MIN_BATCH = 8  # below this, the decoder's batched GEMMs lose more than the page faults cost


def cpu_batch_size(points_per_batch: int, crop_hw: tuple[int, int], masks_per_prompt: int = 3) -> int:
    """Prompts per decoder call on the CPU fast path: ``points_per_batch``, split so a batch's logits fit the budget.

    Why: each batch's (prompts, 3, H, W) fp32 logits are allocated, thresholded and freed. At SAM's 64 prompts
    on a 640×425 image that is 209 MB a batch: 1.1 million page faults and 3 s of system time per image on a
    2-core EPYC, against 17 thousand at 8 prompts (docs/benchmarks.md). Masks do not depend on the batch size.
    """
    per_prompt = masks_per_prompt * crop_hw[0] * crop_hw[1] * 4
    return max(1, min(points_per_batch, max(CPU_MIN_BATCH, CPU_LOGITS_BUDGET_BYTES // per_prompt)))


class _ConfigField:
    """A reference attribute name (``gen.pred_iou_thresh``) that reads and writes the generator's
    :class:`AmgConfig`: the reference's ``generate`` reads its attributes, so code that sets one after
    construction must change what ``generate`` does here too (it was silently ignored). A new value is
    checked as the constructor checks it. As in the reference, ``point_grids`` are made once, at construction."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.config = dataclasses.replace(obj.config, **{self.name: value})


class SamAutomaticMaskGenerator:
    # Label list for masks (closed vocabulary, or open with CLIP); None: the model's class names, if any.
    labels: list[str] | None = None

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        """Build a generator around ``model``; the arguments are documented on :class:`AmgConfig`."""
        self.config = AmgConfig(
            points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=tuple(point_grids) if point_grids is not None else None,
            min_mask_region_area=min_mask_region_area, output_mode=output_mode,
        )
        c = self.config
        self.point_grids: list[np.ndarray] = (
            list(c.point_grids) if c.point_grids is not None
            else layer_point_grids(int(c.points_per_side or 0), c.crop_n_layers, c.crop_n_points_downscale_factor)
        )
        self.predictor = SamPredictor(model)

    @classmethod
    def from_config(cls, model: Sam, config: AmgConfig) -> SamAutomaticMaskGenerator:
        kwargs = {k: getattr(config, k) for k in config.__dataclass_fields__}
        if kwargs["point_grids"] is not None:
            kwargs["point_grids"] = list(kwargs["point_grids"])
        return cls(model, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for everything in an (H, W, 3) uint8 RGB image.

        Returns:
            One dict per mask: ``segmentation`` (per ``output_mode``), ``area`` (pixels), ``bbox``
            (XYWH; W and H are last-minus-first pixel, as in the reference), ``predicted_iou``,
            ``point_coords`` ([[x, y]]), ``stability_score`` and ``crop_box`` (XYWH).
        """
        hook = self._small_regions_override()
        if hook is None:
            anns = self.records_to_annotations(self.generate_records(image))
        else:
            # A subclass's own clean-up replaces the device one: called as the reference's generate calls it,
            # on the reference's record bag, whose returned bag then gives the annotations.
            c = self.config
            mask_data = hook(self._records_to_mask_data(self._candidate_records(image)), c.min_mask_region_area,
                             max(c.box_nms_thresh, c.crop_nms_thresh))
            anns = self._mask_data_to_annotations(mask_data)
        if anns and (self.labels or self.predictor.model.class_head is not None):
            from segany.text.prompting import add_labels  # issue 10: label, label_score, category_id

            add_labels(self, image, anns, self.labels)
        return anns

    @torch.no_grad()
    def generate_records(self, image: np.ndarray) -> MaskRecords:
        """The surviving masks as device tensors, before conversion to the output format.

        Small regions are cleaned by segany's device step; a subclass's ``postprocess_small_regions``, which
        works on the reference's record bag, takes its place in :meth:`generate` only.
        """
        records = self._candidate_records(image)
        if self.config.min_mask_region_area > 0 and len(records):
            records = self._remove_small_regions(records)
        return records

    def _candidate_records(self, image: np.ndarray) -> MaskRecords:
        """The masks that survive every step but the small-region clean-up."""
        if not isinstance(image, np.ndarray):
            raise InputError(f"generate expects a numpy array (H, W, 3), got {type(image).__name__}; "
                             "load files with segany.data.images.load_image")
        image = to_rgb_uint8(image)
        size_hw = (int(image.shape[0]), int(image.shape[1]))
        c = self.config
        boxes, layers = crop_boxes(size_hw, c.crop_n_layers, c.crop_overlap_ratio)
        empty = [layer for (x0, y0, x1, y1), layer in zip(boxes, layers, strict=True) if x1 <= x0 or y1 <= y0]
        if empty:  # the reference fails inside resizing, with "image is empty"
            raise InputError(f"image {size_hw[1]}x{size_hw[0]} is too small for crop_n_layers={c.crop_n_layers}: "
                             f"crops of layer {min(empty)} would hold no pixel; lower crop_n_layers "
                             "(--crop-n-layers) or use a larger image")
        parts = [self._process_crop(image, box, layer, size_hw) for box, layer in zip(boxes, layers, strict=True)]
        records = MaskRecords.cat(parts)
        if len(boxes) > 1 and len(records):
            # Between crops prefer the mask from the smaller crop: it saw the object at higher resolution.
            scores = 1.0 / box_area(records.crop_boxes_xyxy)
            records = records.select(_nms(records.boxes_xyxy, scores.to(records.boxes_xyxy.device), c.crop_nms_thresh))
        return records

    @staticmethod
    def postprocess_small_regions(mask_data: Any, min_area: int, nms_thresh: float) -> Any:
        """Fill holes and drop islands under ``min_area`` pixels in each mask, then drop new duplicates by box NMS.

        The reference generator's step, for code that calls it on its own record bag: ``mask_data`` is a
        :class:`segany.utils.amg.MaskData` (or the reference's ``MaskData``) with ``rles`` (uncompressed
        COCO RLEs) and ``boxes`` ((N, 4) XYXY, inclusive) among its columns. Boxes are measured again on
        the cleaned masks; for NMS at ``nms_thresh`` a mask left unchanged scores 1 and a cleaned one 0, so
        duplicates keep the mask that needed no clean-up. The cleaned masks that survive get new ``rles``
        and ``boxes``; then every column keeps the survivors, in NMS order. Edits ``mask_data`` in place
        and returns it. segany's own :meth:`generate` does the same step on its device records.
        """
        from segany.amg.postprocess import clean_mask_full

        rles = mask_data["rles"]
        if len(rles) == 0:
            return mask_data
        cleaned: dict[int, np.ndarray] = {}
        boxes = torch.zeros(len(rles), 4, dtype=torch.int64)  # inclusive XYXY; zeros for an empty mask
        for i, rle in enumerate(rles):
            mask, changed = clean_mask_full(np.ascontiguousarray(counts_to_mask(rle["counts"], rle["size"])),
                                            min_area)
            if changed:
                cleaned[i] = mask
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size:
                boxes[i] = torch.tensor([cols[0], rows[0], cols[-1], rows[-1]])
        scores = torch.ones(len(rles), dtype=torch.float32)
        scores[list(cleaned)] = 0.0
        keep = _nms(boxes, scores, nms_thresh)
        for i in keep.tolist():
            if i in cleaned:
                h, w = cleaned[i].shape
                mask_data["rles"][i] = {"size": [h, w], "counts": mask_to_counts(cleaned[i]).tolist()}
                mask_data["boxes"][i] = boxes[i]
        mask_data.filter(keep)
        return mask_data

    # ------------------------------------------------------------ internals
    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int, size_hw: tuple[int, int]
                      ) -> MaskRecords:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        crop_hw = (int(crop.shape[0]), int(crop.shape[1]))
        self.predictor.set_image(crop)
        dev = self.device
        points = self.point_grids[layer] * np.array(crop_hw[::-1], dtype=np.float64)[None]  # (P, 2) crop pixels
        # float64 like the reference, so prompts round identically in the prompt encoder.
        points_model = torch.as_tensor(self.predictor.transform.apply_coords(points, crop_hw), device=dev)
        points_t = torch.as_tensor(points, device=dev)
        parts: list[MaskRecords] = []
        bs = self.config.points_per_batch
        if dev.type == "cpu" and getattr(self.predictor, "fast", None) is not None:
            bs = cpu_batch_size(bs, crop_hw)
        for i in range(0, len(points), bs):
            part = self._process_batch(points_t[i:i + bs], points_model[i:i + bs], crop_box, crop_hw, size_hw)
            if part is not None:
                parts.append(part)
        self.predictor.reset_image()
        if not parts:
            return MaskRecords.empty(size_hw, dev)
        records = MaskRecords.cat(parts)
        records = records.select(_nms(records.boxes_xyxy, records.iou_preds, self.config.box_nms_thresh))
        # Boxes were measured in the crop frame; move them and the points to the image frame.
        off = torch.as_tensor([x0, y0, x0, y0], device=dev)
        return MaskRecords(
            rles=records.rles, iou_preds=records.iou_preds, stability=records.stability,
            points_xy=records.points_xy + off[:2].to(torch.float64), boxes_xyxy=records.boxes_xyxy + off,
            crop_boxes_xyxy=off.new_tensor(crop_box).expand(len(records), 4).clone(), areas=records.areas,
        )

    def _process_batch(self, points_xy: torch.Tensor, points_model: torch.Tensor, crop_box: list[int],
                       crop_hw: tuple[int, int], size_hw: tuple[int, int]) -> MaskRecords | None:
        c = self.config
        labels = torch.ones(points_model.shape[0], 1, dtype=torch.int64, device=points_model.device)
        logits, iou_preds, _ = self.predictor.predict_torch(points_model[:, None, :], labels, multimask_output=True,
                                                            return_logits=True)
        k = logits.shape[1]
        logits = logits.flatten(0, 1)  # (B*K, h, w): the K masks of a point are adjacent
        iou_preds = iou_preds.flatten(0, 1)
        points = points_xy.repeat_interleave(k, dim=0)
        mask_threshold = float(self.predictor.model.mask_threshold)

        if c.pred_iou_thresh > 0.0:
            keep = (iou_preds > c.pred_iou_thresh).nonzero().flatten()
            logits, iou_preds, points = logits[keep], iou_preds[keep], points[keep]
        stability = stability_scores(logits, mask_threshold, c.stability_score_offset)
        if c.stability_score_thresh > 0.0:
            keep = (stability >= c.stability_score_thresh).nonzero().flatten()
            logits, iou_preds, points, stability = logits[keep], iou_preds[keep], points[keep], stability[keep]
        if logits.shape[0] == 0:
            return None
        masks = logits > mask_threshold
        del logits
        boxes = masks_to_boxes_xyxy(masks)
        h, w = size_hw
        near = near_crop_edge(boxes, crop_box, [0, 0, w, h])
        if bool(near.any()):
            keep = (~near).nonzero().flatten()
            masks, boxes, iou_preds, points, stability = masks[keep], boxes[keep], iou_preds[keep], points[keep], \
                stability[keep]
            if masks.shape[0] == 0:
                return None
        masks = paste_crop(masks, crop_box, (h, w))  # into the full image frame
        areas = masks.sum(dim=(1, 2))
        return MaskRecords(rles=encode_masks(masks), iou_preds=iou_preds, stability=stability, points_xy=points,
                           boxes_xyxy=boxes, crop_boxes_xyxy=boxes.new_zeros(boxes.shape), areas=areas)

    def _remove_small_regions(self, records: MaskRecords) -> MaskRecords:
        from segany.amg.postprocess import clean_mask_windowed

        c = self.config
        rles = records.rles.to_numpy()
        boxes = records.boxes_xyxy.cpu().numpy().copy()
        n = len(records)
        new_counts: dict[int, np.ndarray] = {}
        for i in range(n):
            counts, box, changed = clean_mask_windowed(rles.counts(i), boxes[i], rles.size_hw, c.min_mask_region_area)
            if changed:
                assert counts is not None
                new_counts[i] = counts
                boxes[i] = box
        # Prefer masks that needed no clean-up, as the reference does: score 1 if unchanged, else 0.
        scores = torch.ones(n, dtype=torch.float32)
        scores[list(new_counts)] = 0.0
        keep = _nms(torch.as_tensor(boxes), scores, max(c.box_nms_thresh, c.crop_nms_thresh))
        if not new_counts:
            return records.select(keep.to(records.iou_preds.device))
        # Rebuild the RLEs on the CPU with the cleaned masks swapped in, then select the survivors.
        changes, offsets, first = [], [0], []
        areas = records.areas.cpu().numpy().copy()
        for i in range(n):
            if i in new_counts:
                ch, starts_one = counts_to_changes(new_counts[i])
                changes.append(ch)
                first.append(starts_one)
                areas[i] = counts_area(new_counts[i])
            else:
                changes.append(rles.changes[rles.offsets[i]:rles.offsets[i + 1]])
                first.append(bool(rles.first[i]))
            offsets.append(offsets[-1] + len(changes[-1]))
        dev = records.iou_preds.device
        rebuilt = RleBatch(torch.as_tensor(np.concatenate(changes).astype(np.int64), device=dev),
                           torch.as_tensor(offsets, dtype=torch.int64, device=dev),
                           torch.as_tensor(first, dtype=torch.bool, device=dev), rles.size_hw)
        updated = MaskRecords(rles=rebuilt, iou_preds=records.iou_preds, stability=records.stability,
                              points_xy=records.points_xy, boxes_xyxy=torch.as_tensor(boxes, device=dev),
                              crop_boxes_xyxy=records.crop_boxes_xyxy, areas=torch.as_tensor(areas, device=dev))
        return updated.select(keep.to(dev))

    # ------------------------------------------------- a subclass's postprocess_small_regions
    def _small_regions_override(self) -> Callable[..., Any] | None:
        """``postprocess_small_regions`` when it is not segany's own and the clean-up is on, else None.

        Looked up on the instance, as the reference's ``generate`` calls it: a subclass's static, class or
        instance method and an attribute set on the generator all count.
        """
        hook = self.postprocess_small_regions
        if self.config.min_mask_region_area <= 0 or hook is _OWN_POSTPROCESS_SMALL_REGIONS:
            return None
        return hook

    @staticmethod
    def _records_to_mask_data(records: MaskRecords) -> Any:
        """The reference's record bag at the clean-up step: a ``MaskData`` of numpy columns and uncompressed RLEs."""
        from segany.utils.amg import MaskData

        rles = records.rles.to_numpy()
        return MaskData(
            iou_preds=records.iou_preds.to(torch.float32).cpu().numpy(),
            points=records.points_xy.to(torch.float64).cpu().numpy(),
            stability_score=records.stability.to(torch.float32).cpu().numpy(),
            boxes=records.boxes_xyxy.to(torch.int64).cpu().numpy(),
            rles=[rles.uncompressed(i) for i in range(len(records))],
            crop_boxes=records.crop_boxes_xyxy.to(torch.int64).cpu().numpy(),
        )

    def _mask_data_to_annotations(self, mask_data: Any) -> list[dict[str, Any]]:
        """Annotations from a record bag (what a subclass's clean-up returned), as the reference builds them:
        areas from the RLEs, boxes and scores read from their columns, whatever their array type."""
        from segany.utils.amg import area_from_rle, coco_encode_rle, rle_to_mask

        rles = mask_data["rles"]
        mode = self.config.output_mode
        if mode == "coco_rle":
            segs: list[Any] = [coco_encode_rle(rle) for rle in rles]
        elif mode == "binary_mask":
            segs = [rle_to_mask(rle) for rle in rles]
        else:
            segs = rles
        mask_data["segmentations"] = segs  # the reference leaves them in the bag too
        return [
            {"segmentation": segs[i], "area": area_from_rle(rles[i]), "bbox": _xywh_list(mask_data["boxes"][i]),
             "predicted_iou": mask_data["iou_preds"][i].item(), "point_coords": [mask_data["points"][i].tolist()],
             "stability_score": mask_data["stability_score"][i].item(),
             "crop_box": _xywh_list(mask_data["crop_boxes"][i])}
            for i in range(len(segs))
        ]

    # ----------------------------------------------------------- output edge
    def records_to_annotations(self, records: MaskRecords) -> list[dict[str, Any]]:
        """Convert device records to the reference's list of annotation dicts (the numpy edge)."""
        n = len(records)
        if n == 0:
            return []
        mode = self.config.output_mode
        rles: NumpyRle = records.rles.to_numpy()
        if mode == "coco_rle":
            segs: list[Any] = rles.to_coco()
        elif mode == "uncompressed_rle":
            segs = [rles.uncompressed(i) for i in range(n)]
        elif records.rles.changes.device.type != "cpu":
            segs = list(decode_masks_torch(records.rles).cpu().numpy())
        else:
            segs = [rles.decode(i) for i in range(n)]
        boxes = records.boxes_xyxy.cpu()
        bbox_xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        crops = records.crop_boxes_xyxy.cpu()
        crop_xywh = torch.cat([crops[:, :2], crops[:, 2:] - crops[:, :2]], dim=1).tolist()
        areas = records.areas.cpu().tolist()
        ious = records.iou_preds.float().cpu().tolist()
        stab = records.stability.float().cpu().tolist()
        points = records.points_xy.cpu().tolist()
        return [
            {"segmentation": segs[i], "area": int(areas[i]), "bbox": bbox_xywh[i], "predicted_iou": ious[i],
             "point_coords": [points[i]], "stability_score": stab[i], "crop_box": crop_xywh[i]}
            for i in range(n)
        ]


def _xywh_list(box_xyxy: Any) -> list[Any]:
    """One (4,) XYXY box (numpy array or tensor) as an XYWH list, computed in the box's own dtype."""
    lo, hi = box_xyxy[:2], box_xyxy[2:]
    if isinstance(box_xyxy, torch.Tensor):
        return torch.cat([lo, hi - lo]).tolist()
    lo, hi = np.asarray(lo), np.asarray(hi)
    return np.concatenate([lo, hi - lo]).tolist()


# generate() uses its device clean-up unless postprocess_small_regions is something else.
_OWN_POSTPROCESS_SMALL_REGIONS = SamAutomaticMaskGenerator.postprocess_small_regions

for _name in AmgConfig.__dataclass_fields__:  # the reference's attribute names (point_grids is the generator's own)
    if _name != "point_grids":
        setattr(SamAutomaticMaskGenerator, _name, _ConfigField(_name))

