"""A full disk anywhere segany writes: one line naming the file the user asked for (not a temp file), the
fix, and nothing half-written left behind (training's and evaluation's own messages: tests/train)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
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


class _FillingFile:
    """A real file on a disk that fills after ``room`` bytes: later writes raise ENOSPC, as the OS does."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.mark.parametrize("room", [0, 200_000])
def test_a_checkpoint_on_a_full_disk_is_an_oserror_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tiny_sam, room: int) -> None:
    """The real torch.save, on a disk that is full at once or fills partway: torch turns the file's OSError
    into RuntimeError("... unexpected pos ..."); the user must still learn that the disk is full, and which
    file it was."""
    real_open = open
    monkeypatch.setattr(segany.atomic, "open",
                        lambda f, mode="r", *a, **k: (_FillingFile(real_open(f, mode, *a, **k), room) if mode == "wb"
                                                      else real_open(f, mode, *a, **k)), raising=False)
    with pytest.raises(OSError) as info:
        save_checkpoint(tiny_sam, tmp_path / "model.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model.pt")
    assert room == 0 or isinstance(info.value.__cause__.__cause__, RuntimeError)  # what torch made of it
    assert list(tmp_path.iterdir()) == []


def test_no_room_for_the_temp_file_names_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def mkstemp(*, dir: str, prefix: str, suffix: str) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(dir, prefix + "x1y2" + suffix))

    monkeypatch.setattr(segany.atomic.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "results.json", "{}")
    assert info.value.filename == str(tmp_path / "results.json")


def test_a_write_outside_the_atomic_writers_promises_nothing(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A full disk in a plain append (a log line) may leave part of it: the message must not say otherwise."""
    import segany.cli.predict

    def run(args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "log.jsonl")

    monkeypatch.setattr(segany.cli.predict, "run", run)
    line = cli_fails(["predict", str(SAMPLE_IMAGE), "--point", "1,1", "--out", "x"], capsys,
                     "the disk is full: could not write log.jsonl. Free space")
    assert "nothing partial" not in line


def test_the_command_line_says_the_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(segany.atomic.os, "replace", _no_space)
    out = tmp_path / "out"
    line = cli_fails(["predict", str(SAMPLE_IMAGE), "--point", "320,212", "--out", str(out), "--quiet"], capsys,
                     f"the disk is full: could not write {out / 'sample_mask0.png'}; nothing partial was left")
    assert "permissions" not in line and ".tmp" not in line
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
