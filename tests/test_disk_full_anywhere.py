"""A full disk anywhere segany writes: one line naming the file the user asked for (not a temp file), the
fix, and nothing half-written left behind (training's and evaluation's own messages: tests/train)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_IMAGE, cli_fails

import segany.atomic
from segany.atomic import atomic_write_text
from segany.checkpoints import save_checkpoint


def _no_space(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_target_not_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segany.atomic.os, "replace", _no_space)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "results.json", "{}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_is_an_oserror_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tiny_sam) -> None:
    """torch.save given a path reports a full disk as RuntimeError("unexpected pos …"), with nothing to say
    it was the disk; given a Python file, the write's OSError(ENOSPC). Both are simulated here."""
    real_save = torch.save

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if isinstance(f, (str, os.PathLike)):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        real_save({"part": 1}, f)  # some bytes reach the file first, as on a real disk
        _no_space()

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as info:
        save_checkpoint(tiny_sam, tmp_path / "model.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_says_the_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(segany.atomic.os, "replace", _no_space)
    out = tmp_path / "out"
    line = cli_fails(["predict", str(SAMPLE_IMAGE), "--point", "320,212", "--out", str(out), "--quiet"], capsys,
                     f"the disk is full: could not write {out / 'sample_mask0.png'}; nothing partial was left")
    assert "permissions" not in line and ".tmp" not in line
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
