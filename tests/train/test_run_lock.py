"""One run per run folder: ``segany train`` holds ``OUT_DIR/.segany-train.lock`` (flock) while it writes the folder.

A second run started on a folder a live run is writing would remove that run's in-flight temp file (the cleanup
of temp files a killed run left) and then both would overwrite each other's last.pt and log. It is refused at
once, naming the folder, the other run's pid and what to do, having touched nothing. A lock file a killed run
left is not held (the OS drops a dead process's flock), so the next run on that folder trains normally.

The live run is a small child process holding the lock as a run does (no torch: it starts in milliseconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_fails
from test_finetune_ux import _opts, _pack

from segany.cli.main import main
from segany.errors import SeganyError
from segany.train.trainer import Trainer

fcntl = pytest.importorskip("fcntl")  # where flock is missing, runs are not locked (docs/cli.md)

TINY_CPU = str(REPO / "configs" / "tiny_cpu.yaml")
LOCK = ".segany-train.lock"  # RunLock.NAME
SMALL = ("model.arch={encoder: {kind: vit, img_size: 64, depth: 1, embed_dim: 32, num_heads: 2, "
         "global_attn_indexes: [0], window_size: 4}}")  # a model that builds and trains a step in no time
# Holds the lock file as RunLock does (flock, its pid in the file) until its stdin closes.
HOLDER = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
          "print('held', flush=True); sys.stdin.read()")


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack(tmp_path_factory.mktemp("pack"))


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_a_second_run_on_a_folder_being_written_is_refused_and_a_killed_runs_lock_is_taken_over(
        pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # The first run, before its first last.pt: its settings and log written, its checkpoint in flight.
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / ".last.pt.k3j2x9.tmp").write_bytes(b"half a checkpoint")
    live = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline() == "held\n"
        before = _files(out)
        real_init = Trainer.__init__

        def no_model(*a: object, **k: object) -> None:
            raise AssertionError("the model was built for a folder another run is writing")

        monkeypatch.setattr(Trainer, "__init__", no_model)
        for resume in ([], ["--resume"]):  # refused before the resume checks read the folder
            line = cli_fails(["train", TINY_CPU, *resume, *_opts(pack, out)], capsys,
                             f"run.out_dir {str(out)!r} is being written by another training run (pid {live.pid})")
            assert "wait for it to finish" in line and "-o run.out_dir=NEW_FOLDER" in line
        assert _files(out) == before  # its temp file, log, settings and lock file as they were
        monkeypatch.setattr(Trainer, "__init__", real_init)

        # From Python (the engine's fine-tunes call fit() directly): refused before any cleanup or write.
        from segany.train.config import load_config

        cfg = load_config(TINY_CPU, ["data.datasets=[mydata]", f"data.pack={pack}", f"run.out_dir={out}", SMALL])
        trainer = Trainer(cfg)
        with pytest.raises(SeganyError, match=f"pid {live.pid}") as info:
            trainer.fit()
        assert type(info.value).__name__ == "TrainingError"
        assert _files(out) == before
    finally:
        live.kill()  # killed, as by the OOM killer or a lost machine: its lock file stays, its flock goes
        live.wait()
        assert live.stdout is not None
        live.stdout.close()

    def check_held(self: Trainer, *a: object, **k: object) -> Path:  # the CLI's export comes after fit()
        fd = (out / LOCK).open("rb")
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fd.close()
        return real_export(self, *a, **k)

    real_export = Trainer.export
    monkeypatch.setattr(Trainer, "export", check_held)
    code = main(["train", TINY_CPU, *_opts(pack, out, "run.max_steps=1", SMALL), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file() and (out / "model_fp16.pt").is_file()
    assert not (out / ".last.pt.k3j2x9.tmp").exists()  # the killed run's temp file, now stale, was removed
    import os

    assert (out / LOCK).read_text().strip() == str(os.getpid())  # the run that took it over
    with (out / LOCK).open("rb") as fd:  # and released at its end
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_the_lock_keeps_no_descriptor_it_did_not_take_and_a_full_disk_does_not_stop_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from segany.train import trainer as tr

    before = _open_fds()
    monkeypatch.setattr(tr.os, "pread", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    monkeypatch.setattr(fcntl, "flock",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EWOULDBLOCK, "busy")))
    with pytest.raises(OSError, match="I/O error"):
        tr.RunLock(tmp_path / "a").acquire()
    assert _open_fds() == before  # the descriptor (and a flock it might hold) is not leaked
    monkeypatch.undo()
    # No room for the pid (the lock file is new, the disk full): the lock is held all the same.
    real_write = os.write
    monkeypatch.setattr(tr.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    lock = tr.RunLock(tmp_path / "b").acquire()
    monkeypatch.setattr(tr.os, "write", real_write)
    with pytest.raises(SeganyError, match="another run in this process"):  # held, though its pid was not written
        tr.RunLock(tmp_path / "b").acquire()
    lock.release()
    tr.RunLock(tmp_path / "b").acquire().release()
    assert _open_fds() == before


def test_a_second_lock_in_the_same_process_says_so_and_the_file_has_the_usual_mode(tmp_path: Path) -> None:
    import os

    from segany.atomic import current_umask
    from segany.train.trainer import RunLock

    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(SeganyError, match=rf"by another run in this process \(pid {os.getpid()}\)"):
            RunLock(tmp_path).acquire()
        assert (tmp_path / LOCK).stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as last.pt, log.jsonl
    finally:
        first.release()


def test_a_save_on_a_processs_own_interrupt_runs_no_collective(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C seen by one DDP process alone (its loader workers died) must not start an all-reduce the others,
    mid-step, would pair with a gradient bucket; that process checks its own weights and saves."""
    import torch

    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam
    from segany.train.config import load_config

    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}"])
    sam = Sam(SamConfig(encoder=ViTConfig(img_size=64, depth=1, embed_dim=32, num_heads=2,
                                          global_attn_indexes=(0,), window_size=4)))
    trainer = Trainer(cfg, sam=sam, train_records=[])
    calls: list[bool] = []
    monkeypatch.setattr(trainer, "_check_weights", lambda doing, all_ranks=False: calls.append(all_ranks))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("a collective ran"))
    with pytest.raises(KeyboardInterrupt):
        trainer._save_on_interrupt(agreed=False)
    assert calls == [False] and (tmp_path / "run" / "last.pt").is_file()
    trainer.save()  # the periodic save, reached by every process alike, agrees
    assert calls == [False, True]
