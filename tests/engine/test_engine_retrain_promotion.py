"""Retraining promotes only on evidence and says why; a finished run keeps no optimizer state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _annotated(tmp_path: Path, n: int) -> tuple[Any, dict, Path]:
    """A project of ``n`` images with one accepted box mask each, and a tiny checkpoint to retrain."""
    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", n))
    for im in store.list_images(proj["id"]):
        m = np.zeros((im["height"], im["width"]), dtype=bool)
        m[20:90, 30:120] = True
        store.save_annotation(im["id"], mask=m, source="manual", label="thing")
    return store, proj, save_tiny_checkpoint(tmp_path / "tiny.pt")


def test_two_step_retrain_explains_and_leaves_no_checkpoints_in_run(tmp_path: Path) -> None:
    from segany.engine.retrain import current_model, retrain

    store, proj, ckpt = _annotated(tmp_path, 3)
    try:
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


def test_a_retrain_waits_for_no_other_retrain_of_the_project(tmp_path: Path) -> None:
    """Two retrains at once wrote one run folder: model version 2's checkpoint came to hold version 3's weights.
    A retrain now claims its project, so a second one is refused before it registers, freezes or writes."""
    import os
    import socket

    from segany.engine.db import JobLock, utcnow
    from segany.engine.locks import ProjectBusyError
    from segany.engine.retrain import retrain

    store, proj, ckpt = _annotated(tmp_path, 2)
    try:
        with store.transaction() as s:  # a live retrain elsewhere on this host (our parent process) holds it
            s.add(JobLock(project_id=proj["id"], kind="retrain", owner=f"{socket.gethostname()}:{os.getppid()}",
                          heartbeat_at=utcnow()))
        settings = RetrainSettings(steps=1, batch_size=1, held_out=0.5, max_objects=1, device="cpu")
        with pytest.raises(ProjectBusyError, match="another `engine retrain` run"):
            retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "run"))
        from segany.engine.versions import list_versions

        assert store.list_model_versions() == [] and list_versions(store, None) == []
        assert not (tmp_path / "run").exists()
    finally:
        store.close()


def test_a_trained_on_image_never_moves_to_the_held_out_side() -> None:
    """A tiny project's fallback held out the image of smallest hash: after that image was removed, the next
    smallest, trained on in v1, was held out in v2, and the parent model was judged on its own training image."""
    from segany.engine.retrain import _split

    v1 = {1: "9" * 64, 2: "a" * 64}  # neither under 0.2 of the hash range
    train1, held1 = _split(v1, 0.2)
    assert (train1, held1) == ([2], [1])
    sides = {**{i: False for i in train1}, **{i: True for i in held1}}
    assert _split({2: "a" * 64, 3: "b" * 64}, 0.2, sides) == ([2], [3])  # image 1 removed, 3 added: 2 stays
    assert _split({1: "9" * 64, 2: "a" * 64, 3: "b" * 64}, 0.2, sides) == ([2, 3], [1])  # 1 stays held out
    assert _split({2: "a" * 64}, 0.2, sides) == ([2], [])
    assert _split({2: "a" * 64, 4: "c" * 64}, 0.2, {2: False, 4: False}) == ([2, 4], [])  # all trained on


def test_a_model_without_weights_is_refused_not_run_on_random_ones(tmp_path: Path, monkeypatch: Any) -> None:
    """Docs audit: `engine auto --model vit_t` without weights ran on random weights and stored its meaningless
    masks as accepted (and marked the images done, so a later run skipped them)."""
    from segany.engine.retrain import model_spec_for

    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "empty"))
    store, _ = make_project(tmp_path / "proj", make_images(tmp_path / "images", 1))
    try:
        with pytest.raises(InputError, match=r"no weights for vit_t were found: run `segany download mobile_sam` "
                                             "or pass --checkpoint FILE"):
            model_spec_for(store, None, model="vit_t")
        assert model_spec_for(store, None).checkpoint  # segany_tiny's shipped weights
    finally:
        store.close()
