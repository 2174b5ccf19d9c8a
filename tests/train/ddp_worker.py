"""One process of a 2-process CPU (gloo) training run under torchrun, for test_ddp.py.

Usage: ``python -m torch.distributed.run --nproc-per-node 2 ddp_worker.py OUT MODES`` with MODES a comma-separated
list of ``clock`` (rank 1's clock runs 200× fast, so on its own it would end a ``run.max_minutes`` budget after one
step) and ``interrupt`` (rank 1 alone gets a Ctrl-C after step 2). Each rank writes ``OUT/MODE/rank{R}.json``: its
step, whether it stopped on an interrupt, and a checksum of its weights.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from synthetic_records import synthetic_records  # beside this script, so on sys.path

from segany.modeling.config import SamConfig, ViTConfig
from segany.modeling.sam import Sam
from segany.train import trainer as trainer_module
from segany.train.config import load_config
from segany.train.trainer import Trainer


def scenario(out: Path, mode: str, rank: int) -> None:
    """One training run of ``mode``; writes ``out/rank{R}.json``."""
    budget = ["run.max_minutes=0.5"] if mode == "clock" else []
    cfg = load_config(None, [f"run.out_dir={out / 'run'}", "run.batch_size=1", "data.max_masks=2",
                             "data.num_workers=0", "recipe.point_rounds=1", "recipe.mask_only_rounds=0",
                             "recipe.loss_size=0", "optim.warmup_steps=0", "optim.lr=1e-3", "run.max_steps=4",
                             "run.log_every=1", "run.ckpt_every=0", *budget])
    torch.manual_seed(0)  # the same initial weights on both ranks, as from a checkpoint
    sam = Sam(SamConfig(encoder=ViTConfig(img_size=128, depth=2, embed_dim=96, num_heads=3,
                                          global_attn_indexes=(1,), window_size=8)))
    data = out / f"data{rank}"  # the same images, written by each rank for itself
    data.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, sam=sam, train_records=synthetic_records(data, n=4))
    real = time.time
    if mode == "clock" and rank == 1:
        start = real()
        trainer_module.time.time = lambda: start + (real() - start) * 200.0  # type: ignore[attr-defined]

    def on_log(entry: dict) -> None:  # rank 0 only logs; it sends rank 1 its Ctrl-C
        if mode == "interrupt" and entry.get("step") == 2:
            os.kill(int(os.environ["PEER_PID"]), signal.SIGINT)

    if mode == "interrupt":
        (out / f"pid{rank}").write_text(str(os.getpid()))
        torch.distributed.barrier()
        os.environ["PEER_PID"] = (out / "pid1").read_text()
    interrupted = False
    try:
        trainer.fit(on_log=on_log)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        trainer_module.time.time = real  # type: ignore[attr-defined]
    checksum = sum(float(p.detach().double().sum()) for p in trainer.sam.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps({"step": trainer.step, "interrupted": interrupted,
                                                      "checksum": checksum}))
    torch.distributed.barrier()  # both ranks done before the next scenario starts


def main() -> None:
    out, modes = Path(sys.argv[1]), sys.argv[2].split(",")
    rank = int(os.environ["RANK"])
    (out / f"worker{rank}.pid").write_text(str(os.getpid()))  # torchrun starts workers in sessions of their own
    torch.set_num_threads(1)
    for mode in modes:  # one launch for all: starting torchrun and two interpreters is most of the time
        scenario(out / mode, mode, rank)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
