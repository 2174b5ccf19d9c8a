"""segany.atomic: every writer's all-or-nothing file, no temp left behind, umask permissions."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

import segany.atomic
from segany.atomic import append_whole, atomic_path, atomic_write, atomic_write_json, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        a = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:  # writers that take a file name (torch.save, ONNX)
            tmp.write_bytes(b"y")
        os.umask(0o077)
        c = atomic_write_json(tmp_path / "c.json", {"k": 1})
    finally:
        os.umask(old)
    assert _mode(a) == 0o644 and _mode(tmp_path / "b.bin") == 0o644 and _mode(c) == 0o600
    assert json.loads(c.read_text()) == {"k": 1} and (tmp_path / "b.bin").read_bytes() == b"y"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, error: type[BaseException]) -> None:
    target = atomic_write_text(tmp_path / "out.json", "old")

    def write(f: object) -> None:
        f.write(b"half")  # type: ignore[attr-defined]
        raise error("stopped mid-write")

    with pytest.raises(error):
        atomic_write(target, write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_folder_in_the_way_fails_without_a_stray_temp(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "out", "x", fsync=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_parent_folders_are_made(tmp_path: Path) -> None:
    assert atomic_write_text(tmp_path / "a" / "b" / "c.txt", "x").read_text() == "x"


class _FillsUp:
    """A file on a disk with ``room`` bytes left: writes take what fits, then fail with ENOSPC."""

    def __init__(self, f: Any, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: Any) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.f.write(bytes(data[: self.room]))
        self.room -= n
        return n

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def test_an_append_that_fills_the_disk_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log.jsonl"
    append_whole(log, b'{"step": 1}\n')
    monkeypatch.setattr(segany.atomic, "open", lambda *a, **k: _FillsUp(open(*a, **k), 5), raising=False)
    with pytest.raises(OSError) as err:
        append_whole(log, b'{"step": 2, "loss": 0.5}\n')
    assert err.value.errno == errno.ENOSPC
    assert log.read_bytes() == b'{"step": 1}\n'  # the half-written record was cut back off

