"""Non-finite weights on one DDP process stop every process with the same TrainingError, before any save.

Only rank 0 writes last.pt, best.pt and the exports, and it refuses NaN weights there; when it checked alone
(finite loss and gradients, NaN weights: a corrupt start checkpoint, an optimizer bug), rank 0 stopped with the
message and the other processes died on a lost connection at their next all-reduce. Now all of them agree on
the check before a save (one all-reduce, as for the loss), so each raises the same error at the same step, even
a process whose own weights are finite.

Two ranks over gloo, as torchrun runs them (WORLD_SIZE set, the Trainer's own DDP wrapper): rank 0 runs in this
process and rank 1 in a spawned one. Not a fork: in the full suite this process has server and thread-pool
threads, and a fork taken while one of them holds a lock can hang the child.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

RANKS = 2


def worker(out: Path, rank: int, port: int) -> dict[str, Any]:
    """One rank's run; rank 0 alone gets a NaN weight from its first optimizer step (rank 1's stay finite).
    Returns the exception type and message fit() raised, the step, and whether this rank's weights are finite."""
    import torch
    import torch.distributed as dist
    from synthetic_records import synthetic_records  # beside this file, so on sys.path

    from segany.modeling.config import SamConfig, ViTConfig
    from segany.modeling.sam import Sam
    from segany.train.config import load_config
    from segany.train.trainer import Trainer

    # The group the Trainer would make under torchrun (it keeps one already made), with a timeout: the old
    # failure left a process waiting in an all-reduce.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=30))
    try:
        cfg = load_config(None, [f"run.out_dir={out / 'run'}", "run.batch_size=1", "data.max_masks=1",
                                 "data.num_workers=0", "recipe.point_rounds=0", "recipe.mask_only_rounds=0",
                                 "recipe.loss_size=0", "optim.warmup_steps=0", "run.max_steps=2",
                                 "run.log_every=1", "run.ckpt_every=1"])
        torch.manual_seed(0)
        sam = Sam(SamConfig(encoder=ViTConfig(img_size=64, depth=1, embed_dim=32, num_heads=2,
                                              global_attn_indexes=(0,), window_size=4)))
        data = out / f"data{rank}"
        data.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, sam=sam, train_records=synthetic_records(data, n=2))
        assert (trainer.rank, trainer.world) == (rank, RANKS) and trainer.ddp is not trainer.net  # DDP-wrapped
        if rank == 0:
            real_step = trainer.optimizer.step

            def nan_step(*a: Any, **k: Any) -> Any:  # an optimizer that writes a NaN from finite gradients
                result = real_step(*a, **k)
                with torch.no_grad():
                    trainer.sam.mask_decoder.iou_token.weight[0, 0] = float("nan")
                return result

            trainer.optimizer.step = nan_step  # type: ignore[method-assign]
        try:
            trainer.fit()
            got: dict[str, Any] = {"type": None, "message": None}
        except Exception as exc:  # what the test checks: which error each rank ended with
            got = {"type": type(exc).__name__, "message": str(exc)}
        got["step"] = trainer.step
        got["finite"] = all(bool(v.isfinite().all()) for v in trainer.sam.state_dict().values())
        return got
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank1(out: Path, port: int) -> None:
    os.environ.update(RANK="1", LOCAL_RANK="1")
    (out / "rank1.json").write_text(json.dumps(worker(out, 1, port)))


def test_nan_weights_on_one_rank_stop_every_rank_with_the_same_error_before_saving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    for key, value in {"WORLD_SIZE": str(RANKS), "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)  # this process is rank 0 of a torchrun launch
    child = multiprocessing.get_context("spawn").Process(target=_rank1, args=(tmp_path, port))
    child.start()
    try:
        r0 = worker(tmp_path, 0, port)
        child.join(timeout=90)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert (tmp_path / "rank1.json").is_file(), f"rank 1 wrote no result (exit code {child.exitcode})"
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["type"] == r1["type"] == "TrainingError", (r0, r1)
    assert r0["message"] == r1["message"], (r0, r1)
    assert (f"not writing {tmp_path / 'run' / 'last.pt'}: 1 weight tensor(s) at step 1 hold NaN or inf "
            "(first: mask_decoder.iou_token.weight)") in r0["message"], r0["message"]
    assert r0["step"] == r1["step"] == 1
    assert not r0["finite"] and r1["finite"]  # rank 1 stopped on rank 0's weights, not its own
    assert not (tmp_path / "run" / "last.pt").exists()
