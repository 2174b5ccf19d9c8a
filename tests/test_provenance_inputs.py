"""Provenance of what segany ran on: weights given as a folder (a Hugging Face layout) are hashed file by file,
and a run's recorded provenance is not a setting to override."""

from __future__ import annotations

from pathlib import Path

import pytest

from segany.errors import InputError
from segany.eval.run import provenance
from segany.hashing import file_digest, weights_digest
from segany.train.config import load_config


def test_a_weights_folder_is_hashed_by_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"second")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"first")
    (folder / "model.safetensors.index.json").write_text("{}")
    rec = provenance(folder, [], "val")  # `segany eval --checkpoint hf/` evaluates such a folder
    assert rec["weights_sha256"] == weights_digest(folder)
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert weights_digest(moved) == rec["weights_sha256"]  # where it lies does not matter
    (moved / "model-00001-of-00002.safetensors").write_bytes(b"FIRST")
    assert weights_digest(moved) != rec["weights_sha256"]
    one = tmp_path / "w.pt"
    one.write_bytes(b"weights")
    assert weights_digest(one) == file_digest(one)


def test_provenance_is_not_an_override() -> None:
    with pytest.raises(InputError, match="provenance is what a run recorded"):
        load_config(None, ["provenance.init=checkpoint"])
