"""Generator defaults per model: SAM's for SAM's models, tuned ones for segany_tiny (which SAM's keep none of)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from segany.amg.config import AmgConfig
from segany.amg.model_defaults import generator_defaults

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "src" / "segany" / "assets" / "samples" / "coco_000000000034.jpg"


def test_sam_models_keep_the_reference_defaults():
    for name in ("vit_b", "vit_h", "vit_t", None, "not_a_model"):
        d = generator_defaults(name)
        assert d["pred_iou_thresh"] == AmgConfig.pred_iou_thresh == 0.88
        assert d["stability_score_thresh"] == 0.95 and d["points_per_side"] == 32 and d["min_mask_region_area"] == 0


def test_segany_tiny_gets_thresholds_on_its_own_scale():
    for name in ("segany_tiny", "segany_tiny_labels"):
        d = generator_defaults(name)
        assert (d["pred_iou_thresh"], d["stability_score_thresh"], d["stability_score_offset"]) == (0.32, 0.8, 0.1)
        assert d["points_per_side"] == 16 and d["min_mask_region_area"] == 800 and d["box_nms_thresh"] == 0.5
        assert d["crop_n_layers"] == 0  # untouched options stay SAM's
    AmgConfig(**generator_defaults("segany_tiny"))  # a valid configuration


def _auto(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "out"
    env = {**os.environ, "SEGANY_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "segany.cli", "auto", str(SAMPLE), "--out", str(out), "--quiet",
                        "--device", "cpu", *extra], capture_output=True, text=True, env=env, timeout=600)
    return r, out


def test_default_command_on_the_default_model_writes_masks(tmp_path):
    """`segany auto IMAGE --out DIR` with nothing else used to write zero masks (SAM's thresholds)."""
    r, out = _auto(tmp_path)
    assert r.returncode == 0, r.stderr
    options = json.loads((out / "run.json").read_text())["settings"]["options"]
    assert options["pred_iou_thresh"] == 0.32 and options["points_per_side"] == 16
    anns = json.loads((out / "coco_000000000034.json").read_text())["annotations"]
    assert len(anns) >= 3 and all(a["predicted_iou"] > 0.32 for a in anns)
    r, out = _auto(tmp_path, "--pred-iou-thresh", "0.9", "--points-per-side", "4")  # what the user sets wins
    assert r.returncode == 0, r.stderr
    options = json.loads((out / "run.json").read_text())["settings"]["options"]
    assert options["pred_iou_thresh"] == 0.9 and options["points_per_side"] == 4
    assert options["stability_score_thresh"] == 0.8  # the rest still segany_tiny's


def test_stage2_prefill_is_strict_on_the_models_own_scale():
    """SAM's strict pre-fill thresholds (0.92 / 0.95) pre-filled nothing for the default model, so stage 2
    was inert with it; segany_tiny's are strict on its scale, SAM models keep SAM's."""
    from segany.checkpoints import build_sam, find_weights
    from segany.data.images import load_image
    from segany.server.model_service import ModelService, PrefillSettings, default_prefill

    assert ModelService("vit_b", device="cpu").prefill_settings == PrefillSettings()
    tuned = ModelService("segany_tiny", device="cpu").prefill_settings
    assert (tuned.pred_iou_thresh, tuned.stability_score_thresh) == (0.40, 0.85)
    sam = build_sam("segany_tiny", checkpoint=find_weights("segany_tiny"))
    image = load_image(SAMPLE)
    # An 8x8 grid (the thresholds are what is tested; 16x16 decodes 4x the prompts, 20 s more on 2 cores).
    assert default_prefill(sam, image, dataclasses.replace(PrefillSettings(), points_per_side=8)) == []
    masks = default_prefill(sam, image, dataclasses.replace(tuned, points_per_side=8))
    assert len(masks) >= 1 and all(m["predicted_iou"] > 0.40 for m in masks)
