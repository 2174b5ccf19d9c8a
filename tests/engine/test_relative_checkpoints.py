"""A checkpoint named by a relative path is stored with its model version as an absolute one.

`segany engine retrain --checkpoint tiny.pt` (or `serve --checkpoint tiny.pt`) registered the path as typed; a later
`serve` or `engine auto` started from another folder then found the project's current model "gone".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from segany.engine.retrain import model_spec_for
from segany.engine.store import open_store
from segany.server.model_service import ModelService


def test_the_engine_resolves_a_relative_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tiny.pt").write_bytes(b"weights")
    store = open_store(tmp_path / "proj", create=True)
    try:
        store.create_project("p")
        monkeypatch.chdir(tmp_path / "weights")
        spec = model_spec_for(store, None, model="vit_b", checkpoint="tiny.pt")
    finally:
        store.close()
    assert spec.checkpoint == str(tmp_path / "weights" / "tiny.pt")


def test_the_server_resolves_a_relative_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ModelService("vit_b", "tiny.pt", device="cpu").checkpoint == str(tmp_path / "tiny.pt")
    assert ModelService("vit_b", None, device="cpu").checkpoint is None
    assert ModelService("segany_tiny", "bundled", device="cpu").checkpoint == "bundled"  # build_sam's name for them
