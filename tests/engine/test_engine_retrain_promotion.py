"""Retraining promotes only on evidence and says why; a finished run keeps no optimizer state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import make_images, make_project, save_tiny_checkpoint

from segany.engine.retrain import RetrainSettings
from segany.errors import InputError


def test_promotion_needs_margin_and_enough_objects() -> None:
    from segany.engine.retrain import promotion_decision

    s = RetrainSettings()
    promoted, why = promotion_decision(0.6590, 0.6616, 4, s)  # the audit's case: 4 objects, +0.0026
    assert not promoted and "only 4 held-out objects" in why and "--min-eval-objects 20" in why
    promoted, why = promotion_decision(0.6590, 0.6616, 200, s)
    assert not promoted and "below --min-gain 0.01" in why
    promoted, why = promotion_decision(0.60, 0.65, 200, s)
    assert promoted and "gain +0.0500" in why
    assert promotion_decision(0.7, 0.6, 1, RetrainSettings(always_promote=True))[0]
    with pytest.raises(Exception, match="--min-gain must be in"):
        RetrainSettings(min_gain=-0.1)


def test_two_step_retrain_explains_and_leaves_no_checkpoints_in_run(tmp_path: Path) -> None:
    from segany.engine.retrain import current_model, retrain

    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", 3))
    try:
        for im in store.list_images(proj["id"]):
            m = np.zeros((im["height"], im["width"]), dtype=bool)
            m[20:90, 30:120] = True
            store.save_annotation(im["id"], mask=m, source="manual", label="thing")
        ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
        settings = RetrainSettings(steps=2, batch_size=1, held_out=0.34, max_objects=2, device="cpu")
        result = retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "run"))
        assert result["promoted"] is False and "held-out objects were evaluated" in result["promotion_reason"]
        assert current_model(store, None) is None  # the project keeps its model
        assert not list((tmp_path / "run").rglob("*.pt"))[1:]  # only model.pt, no optimizer state
        assert [p.name for p in (tmp_path / "run").rglob("*.pt")] == ["model.pt"]
        assert (tmp_path / "run" / "run" / "log.jsonl").is_file()
        weights = (tmp_path / "run" / "model.pt").read_bytes()
        with pytest.raises(InputError, match="already holds a retrained model.pt"):  # its row names that file
            retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "run"))
        assert (tmp_path / "run" / "model.pt").read_bytes() == weights
    finally:
        store.close()


def test_default_retrain_folders_never_reuse_a_registered_model(tmp_path: Path) -> None:
    """Two retrains from the same dataset version and parent used to share a folder, the second overwriting the
    first's model.pt under the first's model-version row."""
    from segany.engine.retrain import _run_folder

    default = tmp_path / "v1-abc-from-1"
    assert _run_folder(None, default) == default
    default.mkdir()
    (default / "model.pt").write_bytes(b"w")
    second = _run_folder(None, default)
    assert second == tmp_path / "v1-abc-from-1-2"
    second.mkdir()
    (second / "model.pt").write_bytes(b"w")
    assert _run_folder(None, default) == tmp_path / "v1-abc-from-1-3"
