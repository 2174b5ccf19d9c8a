"""Weights shipped as parts: split/join round trip, sha256 verification, and a content-keyed join cache."""

from __future__ import annotations

import os

import pytest

from segany.bundled import join_parts, resolve_parts, split_file
from segany.errors import CheckpointError


def test_split_join_roundtrip_and_corruption(tmp_path) -> None:
    src = tmp_path / "w.pt"
    data = bytes(range(256)) * 50
    src.write_bytes(data)
    parts = split_file(src, tmp_path / "parts", part_bytes=5000)
    assert len(parts) == 3
    assert join_parts(parts[0], tmp_path / "joined.pt").read_bytes() == data
    parts[1].write_bytes(b"x" + parts[1].read_bytes()[1:])
    with pytest.raises(CheckpointError, match="sha256"):
        join_parts(parts[0], tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()  # nothing half-written


def test_resolve_parts_never_reuses_a_join_of_other_content(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    src = tmp_path / "w.pt"
    (tmp_path / "ship").mkdir()
    src.write_bytes(b"old weights" * 100)
    split_file(src, tmp_path / "ship", part_bytes=600)
    first = resolve_parts(tmp_path / "ship" / "w.pt")
    assert first.read_bytes() == src.read_bytes()
    # New weights at the same path, with parts older than the cached join: still rejoined.
    src.write_bytes(b"new weights" * 100)
    for p in split_file(src, tmp_path / "ship", part_bytes=600):
        os.utime(p, (0, 0))
    second = resolve_parts(tmp_path / "ship" / "w.pt")
    assert second != first and second.read_bytes() == src.read_bytes()
