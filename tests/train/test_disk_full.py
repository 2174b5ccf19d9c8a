"""A full disk during ``segany train`` or ``segany eval`` is one line naming the file, saying the disk is full
and what to do (free space or another folder; ``--resume`` from the last good last.pt), exit 1, and no partial
file left behind. The full disk is simulated where the bytes are written: the file under the real torch.save
(which makes the file's OSError an opaque RuntimeError), the log append and the atomic JSON writer write part
of their bytes, then fail with ENOSPC as a real disk would."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from test_finetune_ux import _opts, _pack

import segany.atomic
import segany.train.trainer
from segany.cli.main import main

TINY_CPU = str(REPO / "configs" / "tiny_cpu.yaml")


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack(tmp_path_factory.mktemp("pack"))


def _full_disk_for(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a file called ``name`` (its temp file ``.name.XXXX.tmp`` included) runs out of space midway."""
    def hit(target: Any) -> bool:
        n = Path(getattr(target, "name", target)).name
        return n == name or n.startswith(f".{name}.")

    # A checkpoint's first 100 kB fit: torch.save has written part of its zip when the disk fills, the case
    # where it makes the file's OSError into RuntimeError("unexpected pos ...").
    room = [100_000 if name.endswith(".pt") else 0]

    class HalfWrite:  # a file whose writes fit until the room is used, then land half their bytes and fail
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            n = len(memoryview(data).cast("B"))
            if n <= room[0]:
                room[0] -= n
                return self.f.write(data)
            self.f.write(memoryview(data).cast("B")[: n // 2])
            self.f.flush()
            raise _enospc()

        def __enter__(self) -> HalfWrite:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.f, attr)

    def fake_open(file: Any, *a: Any, **k: Any) -> Any:
        f = open(file, *a, **k)
        return HalfWrite(f) if hit(file) else f

    # checkpoints and exports (the real torch.save) and the log's appends (append_whole) all open files there
    monkeypatch.setattr(segany.atomic, "open", fake_open, raising=False)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    text = capsys.readouterr().err
    err = [x for x in text.splitlines() if x.startswith("segany: error")]
    assert len(err) == 1 and "Traceback" not in text, text
    return err[0]


@pytest.mark.parametrize("name", ["last.pt", "model_fp16.pt", "log.jsonl"])
def test_train_on_a_full_disk_names_the_file_and_the_fix(name: str, pack: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    argv = ["train", TINY_CPU, *_opts(pack, out, "run.max_steps=1"), "--quiet"]
    with monkeypatch.context() as m:
        _full_disk_for(name, m)
        assert main(argv) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"segany: error: the disk is full: could not write {out / name}"), line
    assert "Free space on that disk" in line and "run.out_dir" in line, line
    if name == "model_fp16.pt":  # last.pt was written first: --resume continues from it
        assert f"rerun with --resume: it continues from the last good {out / 'last.pt'} (step 1)" in line, line
        assert "MB" in line  # how much the file needs
    else:
        assert "no last.pt was saved yet" in line, line
    # Nothing partial: no temp file, no torn file, no torn log line.
    assert not list(out.glob(".*.tmp")), list(out.iterdir())
    if name == "log.jsonl":
        assert (out / name).read_bytes() == b""
    else:
        assert not (out / name).exists()
    if name == "model_fp16.pt":  # the advice works: with space again, --resume writes what was missing
        assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
        assert torch.load(out / name, map_location="cpu", weights_only=True)["meta"]["trained_steps"] == 1


def test_eval_on_a_full_disk_names_the_file(pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import randomize_, tiny_config

    from segany.checkpoints import save_checkpoint
    from segany.modeling.sam import Sam

    ckpt = save_checkpoint(randomize_(Sam(tiny_config())), tmp_path / "tiny.pt")
    real = segany.atomic.atomic_write

    def atomic_write(path: Any, write: Any, *, fsync: bool = False) -> Path:
        if Path(path).name != "results.json":
            return real(path, write, fsync=fsync)
        with segany.atomic.atomic_path(path) as tmp:
            tmp.write_bytes(b'{"meta": ')
            raise _enospc()

    monkeypatch.setattr(segany.atomic, "atomic_write", atomic_write)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(pack), "--max-clicks", "1", "--quiet",
                 "--out", str(out)]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"segany: error: the disk is full: could not write {out / 'results.json'}"), line
    assert "pass another --out" in line, line
    assert sorted(p.name for p in out.iterdir()) == []  # no results.json, no temp file



def test_the_trainers_disk_full_fix_is_worded_only_when_the_disk_is_full(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every log line and checkpoint is written inside ``Trainer.writing``; its fix looks for last.pt on disk, so
    it is worded when a write fails for space, not before each write."""
    from segany.errors import SeganyError
    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam
    from segany.train.config import load_config
    from segany.train.trainer import Trainer

    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    trainer = Trainer(cfg, sam=Sam(SamConfig(encoder=ViTConfig(img_size=64, depth=1, embed_dim=32, num_heads=2,
                                                               global_attn_indexes=(0,), window_size=4))),
                      train_records=[])
    (tmp_path / "last.pt").write_bytes(b"state")
    trainer.saved_state = (tmp_path / "last.pt", 3)
    looks: list[Path] = []
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: looks.append(self) or real_is_file(self))
    with trainer.writing(tmp_path / "log.jsonl", 10):
        pass
    with pytest.raises(OSError, match="denied"), trainer.writing(tmp_path / "log.jsonl", 10):
        raise PermissionError(errno.EACCES, "denied")  # not a full disk: unchanged
    assert looks == []
    with pytest.raises(SeganyError, match=r"the disk is full: could not write .*log.jsonl.*rerun with --resume: "
                                          r"it continues from the last good .*last.pt \(step 3\)") as info:
        with trainer.writing(tmp_path / "log.jsonl", 10):
            raise _enospc()
    assert isinstance(info.value.__cause__, OSError) and looks == [tmp_path / "last.pt"]
