"""One run per run folder: ``segany train`` holds ``OUT_DIR/.lock`` (flock) while it writes the folder.

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
LOCK = ".lock"  # OUT_DIR/.lock, RunLock.NAME
SMALL = ("model.arch={encoder: {kind: vit, img_size: 64, depth: 1, embed_dim: 32, num_heads: 2, "
         "global_attn_indexes: [0], window_size: 4}}")  # a model that builds and trains a step in no time
# Holds OUT_DIR/.lock as RunLock does (flock, its pid in the file) until its stdin closes.
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
                             f"run.out_dir {str(out)!r} is being written by another `segany train` (pid {live.pid})")
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
