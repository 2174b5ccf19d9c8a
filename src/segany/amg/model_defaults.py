"""Generator settings per model for the command line: SAM's for SAM's models, tuned ones for segany_tiny.

Why: SAM's thresholds (predicted IoU 0.88, stability 0.95) fit SAM's confident heads. segany_tiny, trained
for minutes, predicts IoUs of 0.15–0.6 and soft logits, so with SAM's thresholds `segany auto` on the default
model wrote no mask at all. Its defaults come from its own scale: about its top quarter by predicted IoU,
which ranks its masks well (AR@10 6× a random order, docs/benchmarks.md), only stable masks, holes and
islands under 800 px cleaned, and overlaps merged from 0.5 box IoU. The grid is 16×16, as in every
figure measured for it: its input is 512 px, so that is a point every 32 input pixels.

The Python API (``SamAutomaticMaskGenerator``) keeps SAM's defaults whatever the model, as the reference
does; these apply where segany picks the settings for a user who gave none.
"""

from __future__ import annotations

from typing import Any

from segany.amg.config import AmgConfig

__all__ = ["default_note", "generator_defaults", "prefill_defaults"]

_TUNED_FOR_SEGANY_TINY: dict[str, Any] = {
    "points_per_side": 16,
    "pred_iou_thresh": 0.32,
    "stability_score_thresh": 0.8,
    "stability_score_offset": 0.1,
    "box_nms_thresh": 0.5,
    "min_mask_region_area": 800,
}
_TUNED = {"segany_tiny": _TUNED_FOR_SEGANY_TINY, "segany_tiny_labels": _TUNED_FOR_SEGANY_TINY}


def generator_defaults(model: str | None) -> dict[str, Any]:
    """The generator's settings for ``model`` where the user set none: AmgConfig's (SAM's), with the
    tuned values of a model segany trained itself."""
    base = {name: getattr(AmgConfig, name) for name in AmgConfig.__dataclass_fields__
            if name not in ("point_grids", "output_mode")}
    return {**base, **_TUNED.get(model or "", {})}


def default_note(name: str) -> str:
    """Help text for a generator option: SAM's default, and segany_tiny's where it differs."""
    sam, tiny = generator_defaults(None)[name], _TUNED_FOR_SEGANY_TINY.get(name)
    return f"default {sam:g}" + (f"; segany_tiny {tiny:g}" if tiny is not None and tiny != sam else "")


# Stage 2 pre-fills only masks the model is sure of, so its thresholds sit above the generator's. For SAM's
# models these are PrefillSettings' own defaults.
_PREFILL_SEGANY_TINY: dict[str, Any] = {"points_per_side": 16, "pred_iou_thresh": 0.40, "stability_score_thresh": 0.85,
                                        "box_nms_thresh": 0.5, "min_mask_region_area": 800,
                                        "extra": {"stability_score_offset": 0.1}}


def prefill_defaults(model: str | None) -> dict[str, Any]:
    """Stage-2 pre-fill settings (``PrefillSettings`` fields) for ``model`` that differ from its defaults.
    SAM's strict thresholds pre-fill nothing for segany_tiny, so it gets strict ones on its own scale:
    about 2–8 masks on the bundled samples, against 7–16 at the generator's defaults."""
    return dict(_PREFILL_SEGANY_TINY) if model in _TUNED else {}
