"""A run whose claim on its project is taken over stops before it writes anything more.

A claim is taken over when its heartbeats stop for the stale limit (a suspended laptop, a network split); the
run learns it at its next check (segany.engine.locks.ClaimLostError). `engine auto` used to write one more image
before its touch after the result noticed, and `engine retrain` noticed only in its heartbeat thread, which
logged it, so the run went on to register its model and make it the project's current one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_fixtures import make_images, make_project, save_tiny_checkpoint
from sqlalchemy import select, update
from test_engine_retrain_promotion import _annotated

from segany.engine.auto import AutoSettings, ImageResult, ModelSpec, count_sets, run_auto
from segany.engine.db import JobLock
from segany.engine.locks import ClaimLostError

OTHER = "other-host:4242"


class CornerGenerator:
    """One mask per image (its top-left corner) without running the model: these tests are about the claim."""

    def __init__(self, sam: Any, *, output_mode: str = "binary_mask", **_: Any) -> None:
        pass

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        h, w = image.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[:8, :8] = True
        return [{"segmentation": mask, "predicted_iou": 0.9, "stability_score": 0.9, "point_coords": [[4.0, 4.0]],
                 "crop_box": [0, 0, w, h]}]


def _take_over(store: Any, project_id: int, kind: str) -> None:
    """What a run on another host does to a claim it finds stale: the claim becomes its own."""
    with store.transaction() as s:
        s.execute(update(JobLock).where(JobLock.project_id == project_id, JobLock.kind == kind)
                  .values(owner=OTHER))


def _claim_owner(store: Any, project_id: int, kind: str) -> str | None:
    with store.transaction(write=False) as s:
        return s.scalar(select(JobLock.owner).where(JobLock.project_id == project_id, JobLock.kind == kind))


def test_auto_writes_nothing_after_its_claim_is_taken_over(tmp_path: Path) -> None:
    store, proj = make_project(tmp_path / "proj", make_images(tmp_path / "images", 3))
    spec = ModelSpec("vit_b", str(save_tiny_checkpoint(tmp_path / "tiny.pt")), "cpu")
    settings = AutoSettings(points_per_side=1, generator=f"{__name__}:CornerGenerator")
    seen: list[int] = []

    def after(result: ImageResult, written: bool) -> None:
        seen.append(result.image_id)
        if len(seen) == 1:  # the first image is written; then another run takes the project over
            _take_over(store, proj["id"], "auto")

    try:
        with pytest.raises(ClaimLostError, match="lost its claim"):
            run_auto(store, None, spec, settings, on_result=after)
        done = [i for i, (_, marker) in count_sets(store, proj["id"]).items() if marker is not None]
        assert done == seen[:1], "the run wrote an image after its claim was taken over"
        assert _claim_owner(store, proj["id"], "auto") == OTHER  # the other run's claim is left alone
    finally:
        store.close()


def test_retrain_stops_before_registering_after_its_claim_is_taken_over(tmp_path: Path) -> None:
    from segany.engine.retrain import RetrainSettings, current_model, retrain

    store, proj, ckpt = _annotated(tmp_path, 2)

    def log(message: str) -> None:
        if message.startswith("fine-tuning"):  # while it trains, another retrain takes the project over
            _take_over(store, proj["id"], "retrain")

    settings = RetrainSettings(steps=2, batch_size=1, held_out=0.5, max_objects=1, always_promote=True,
                               device="cpu")
    try:
        with pytest.raises(ClaimLostError, match="`engine retrain` run .* lost its claim"):
            retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "run"),
                    log=log)
        assert [mv["checkpoint_path"] for mv in store.list_model_versions()] == [str(ckpt)]  # the parent only
        assert current_model(store, None) is None
        assert not list((tmp_path / "run").rglob("*.pt"))
        assert _claim_owner(store, proj["id"], "retrain") == OTHER
    finally:
        store.close()
