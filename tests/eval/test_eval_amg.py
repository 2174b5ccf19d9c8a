"""Automatic masks as proposals (segany.eval.amg): AR@K from the generator's ranked output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.amg.generator import SamAutomaticMaskGenerator
from segany.data.formats.common import InstanceRecord, encode_mask
from segany.eval.amg import AmgEvalSettings, evaluate_amg, format_amg_table


def _records(tmp_path: Path) -> tuple[list[InstanceRecord], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    records, gts = [], []
    for k in range(2):
        img = (rng.random((80, 100, 3)) * 60).astype(np.uint8)
        gt = np.zeros((80, 100), bool)
        gt[20 + k: 60, 30: 75 - k] = True
        img[gt] = [220, 200, 30]
        Image.fromarray(img).save(tmp_path / f"x{k}.png")
        records.append(InstanceRecord(str(tmp_path / f"x{k}.png"), (80, 100), [encode_mask(gt)],
                                      dataset="syn", image_id=f"x{k}"))
        gts.append(gt)
    return records, gts


def _junk(i: int) -> np.ndarray:
    m = np.zeros((80, 100), bool)
    m[i % 70: i % 70 + 5, 0:5] = True
    return m


@pytest.mark.parametrize("n_junk_above, ar10, ar100", [(3, 1.0, 1.0), (12, 0.0, 1.0)])
def test_recall_counts_the_top_k_by_predicted_iou(tmp_path, tiny_sam, monkeypatch, n_junk_above, ar10, ar100):
    records, gts = _records(tmp_path)
    calls = iter(range(len(gts)))

    def fake_generate(self, image):  # the object itself, ranked below n_junk_above junk masks
        gt = gts[next(calls)]
        anns = [{"segmentation": encode_mask(_junk(i)), "predicted_iou": 0.99 - 0.01 * i, "stability_score": 0.1}
                for i in range(n_junk_above)]
        return anns + [{"segmentation": encode_mask(gt), "predicted_iou": 0.5, "stability_score": 0.9}]

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", fake_generate)
    res = evaluate_amg(tiny_sam, records)
    assert res["syn"]["images"] == 2 and res["syn"]["objects"] == 2
    assert res["all"]["proposals_per_image"] == n_junk_above + 1
    assert res["all"]["AR@10"] == pytest.approx(ar10) and res["all"]["AR@100"] == pytest.approx(ar100)
    # Same proposals, other orders: by stability the object comes first, so its AR@10 is full.
    assert res["rankings"]["predicted_iou"]["AR@10"] == pytest.approx(ar10)
    assert res["rankings"]["stability_score"]["AR@10"] == pytest.approx(1.0)
    assert set(res["rankings"]) == {"predicted_iou", "stability_score", "iou_x_stability", "random"}
    table = format_amg_table(res)
    assert "AR@1000" in table and "ranked by random" in table


def test_the_real_generator_on_a_tiny_model(tmp_path, tiny_sam):
    records, _ = _records(tmp_path)
    res = evaluate_amg(tiny_sam, records, AmgEvalSettings(points_per_side=4))
    assert res["settings"]["points_per_side"] == 4 and res["all"]["images"] == 2
    assert res["all"]["proposals_per_image"] > 0
    for k in ("AR@10", "AR@100", "AR@1000"):
        assert 0.0 <= res["all"][k] <= 1.0
    assert res["all"]["AR@10"] <= res["all"]["AR@100"] <= res["all"]["AR@1000"]
    json.dumps(res)  # what the CLI writes


@pytest.mark.parametrize("extra, says", [(["--points-per-side", "0"], "--points-per-side must be at least 1"),
                                         (["--grabcut"], "does not apply to --amg")])
def test_cli_refuses_bad_amg_options_before_loading_anything(tmp_path, extra, says):
    r = subprocess.run([sys.executable, "-m", "segany.cli", "eval", "--amg", *extra,
                        "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()
