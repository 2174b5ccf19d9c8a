"""A run's outputs say what made them, not only ``model.checkpoint: bundled``: the sha256 of the start weights
actually loaded (None from scratch), the segany and torch versions and the data's fingerprint, in config.json,
last.pt and every checkpoint it writes (best, best_fp16, the exported fp16); ``segany eval``'s results.json has
the evaluated weights' sha256 and a data fingerprint comparable with the run's held-out one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, randomize_, tiny_config
from test_finetune_ux import _opts, _pack

import segany
from segany.cli.main import main
from segany.hashing import file_digest

TINY_CPU = str(REPO / "configs" / "tiny_cpu.yaml")
VERSIONS = {"segany_version": segany.__version__, "torch_version": str(torch.__version__)}


def _meta(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


def test_a_fine_tune_and_its_eval_record_weights_data_and_versions(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from segany.checkpoints import save_checkpoint
    from segany.modeling.sam import Sam

    pack = _pack(tmp_path)
    start = save_checkpoint(randomize_(Sam(tiny_config())), tmp_path / "start.pt")  # tiny_cpu's architecture
    out = tmp_path / "run"
    assert main(["train", TINY_CPU, *_opts(pack, out, "run.max_steps=1", f"model.checkpoint={start}"),
                 "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["checkpoint"] == str(start)  # the setting is kept as it was
    prov = config["provenance"]
    assert prov["init"] == "checkpoint" and prov["init_checkpoint"] == str(start)
    assert prov["init_sha256"] == file_digest(start)
    assert {k: prov[k] for k in VERSIONS} == VERSIONS
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert prov["data"] == state["data"]  # the fingerprint --resume checks: train and val records, sha256
    assert prov["data"]["train_images"] == 3 and prov["data"]["val_images"] == 2
    assert state["provenance"] == prov
    assert _meta(out / "model_fp16.pt")["provenance"] == prov

    # segany eval of the exported weights on the pack's held-out split: the same data fingerprint as the run's.
    assert main(["eval", "--checkpoint", str(out / "model_fp16.pt"), "--data", str(pack), "--max-clicks", "1",
                 "--quiet", "--out", str(tmp_path / "eval")]) == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]["provenance"]
    assert ev["weights_sha256"] == file_digest(out / "model_fp16.pt")
    assert ev["data"] == {"val": prov["data"]["val"], "val_images": 2}
    assert {k: ev[k] for k in VERSIONS} == VERSIONS


def test_from_scratch_records_no_start_weights_and_best_checkpoints_carry_it(tmp_path: Path) -> None:
    from segany.train.config import load_config
    from segany.train.trainer import Trainer

    pack = _pack(tmp_path)
    opts = _opts(pack, tmp_path / "run", "run.val_objects=1")
    cfg = load_config(TINY_CPU, [kv for kv in opts if kv != "-o"])
    trainer = Trainer(cfg)
    prov = trainer.provenance()
    assert prov["init"] == "random" and prov["init_checkpoint"] is None and prov["init_sha256"] is None
    assert trainer.validate()["best"]  # the first validated step is the best so far: best.pt and best_fp16.pt
    for name in ("best.pt", "best_fp16.pt"):
        assert _meta(tmp_path / "run" / name)["provenance"] == prov
