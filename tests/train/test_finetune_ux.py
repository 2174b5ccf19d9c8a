"""Fine-tuning as a user meets it: frozen parts stay frozen, resumes keep one run, the shipped weights are the
easy start, data mistakes name the datasets, validation keeps best.pt, and the log/summary tell the truth.

The CLI tests run ``segany train`` in-process on a real pack of a few synthetic images (dataset ``mydata``,
as a user's own pack would be) with the tests' tiny ViT (configs/tiny_cpu.yaml).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli_fails

from segany.data.formats.common import InstanceRecord, encode_mask
from segany.errors import CheckpointError, InputError, UnknownModelError
from segany.modeling.config import SamConfig, TinyViTConfig
from segany.modeling.sam import Sam
from segany.train.config import load_config
from segany.train.trainer import Trainer

TINY_CPU = str(REPO / "configs" / "tiny_cpu.yaml")
FINETUNE = str(REPO / "configs" / "segany_tiny_cpu_finetune.yaml")
# Small enough for ~1 s per step on 2 cores; the rest of tiny_cpu.yaml (256 px depth-2 ViT) is kept.
FAST = ["run.batch_size=1", "data.max_masks=1", "data.num_workers=0", "recipe.point_rounds=0", "run.log_every=5",
        "run.ckpt_every=0"]


def _pack(root: Path, dataset: str = "mydata", n_train: int = 3) -> Path:
    """A real pack (manifest + JPEGs) of ``n_train`` train and 5 - n_train val images, one object each."""
    from PIL import Image

    from segany.data.pack import pack_records

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(5):
        img = (rng.random((96, 120, 3)) * 60).astype(np.uint8)
        m = np.zeros((96, 120), bool)
        m[10 + 4 * i : 70, 20 : 100 - 6 * i] = True
        img[m] = [200, 40, 40]
        path = root / "src" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        rec = InstanceRecord(str(path), (96, 120), [encode_mask(m)], image_id=str(i), dataset=dataset)
        pairs.append(("train" if i < n_train else "val", rec))
    pack_records(pairs, root / "pack")
    return root / "pack"


def _train(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from segany.cli.main import main

    code = main(["train", *argv, "--quiet"])
    return code, capsys.readouterr().err


def _opts(pack: Path, out: Path, *extra: str, mine: bool = True) -> list[str]:
    """``-o`` options for the pack and run folder; ``mine`` names the pack's dataset (a later extra wins)."""
    mine_opt = ["data.datasets=[mydata]"] if mine else []
    return [a for kv in [f"data.pack={pack}", f"run.out_dir={out}", *mine_opt, *FAST, *extra] for a in ("-o", kv)]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack(tmp_path_factory.mktemp("pack"))


# ----------------------------------------------------------------------------- finding 3: frozen encoder
def _tinyvit_sam() -> Sam:
    torch.manual_seed(0)
    enc = TinyViTConfig(img_size=128, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
                        window_sizes=(4, 4, 4, 4), num_classes=0)
    return Sam(SamConfig(encoder=enc))


def _batch(S: int = 128) -> dict:
    masks = torch.zeros(1, 1, S, S, dtype=torch.bool)
    masks[0, 0, 20:90, 30:100] = True
    return {"image": torch.randn(1, 3, S, S), "masks": masks, "num_masks": torch.tensor([1])}


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [f"run.out_dir={tmp_path}", "recipe.point_rounds=0", "recipe.mask_only_rounds=0",
                              "recipe.loss_size=0", "optim.warmup_steps=0", "run.max_steps=3", *extra])


def test_frozen_encoder_keeps_batchnorm_statistics_and_eval_mode(tmp_path: Path) -> None:
    sam = _tinyvit_sam()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in sam.image_encoder.modules())
    before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    tr = Trainer(_cfg(tmp_path, "optim.freeze_image_encoder=true"), sam=sam)
    for _ in range(3):
        tr.train_step(_batch())
        assert not tr.sam.image_encoder.training and tr.sam.mask_decoder.training
    changed = [k for k, v in tr.sam.image_encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []


def test_decoder_only_fine_tuning_freezes_prompt_encoder_too(tmp_path: Path) -> None:
    sam = _tinyvit_sam()
    frozen_before = {k: v.clone() for k, v in sam.state_dict().items() if not k.startswith("mask_decoder.")}
    dec_before = sam.mask_decoder.output_upscaling[0].weight.detach().clone()
    tr = Trainer(_cfg(tmp_path, "optim.freeze_image_encoder=true", "optim.freeze_prompt_encoder=true"), sam=sam)
    trained = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in tr.sam.mask_decoder.parameters()}
    tr.train_step(_batch())
    after = tr.sam.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert not torch.equal(tr.sam.mask_decoder.output_upscaling[0].weight, dec_before)


# ----------------------------------------------------------------------------- finding 4 and 9: resume
def test_resume_refuses_changed_maths_and_keeps_the_runs_first_loss(pack: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, err = _train(capsys, TINY_CPU, *_opts(pack, out, "run.max_steps=2"))
    assert code == 0, err
    first = json.loads((out / "summary.json").read_text())
    files = {p: p.read_bytes() for p in (out / "model_fp16.pt", out / "config.json", out / "last.pt")}

    line = cli_fails(["train", TINY_CPU, "--resume", *_opts(pack, out, "run.max_steps=3", "optim.lr=0.5")], capsys,
                     "optim.lr")
    assert "run.out_dir=FOLDER" in line and "run.max_steps" not in line.split(";")[0]
    cli_fails(["train", TINY_CPU, "--resume", *_opts(pack, out, "model.name=vit_t")], capsys, "model.name")
    assert all(p.read_bytes() == b for p, b in files.items())  # nothing rewritten by a refused resume

    code, err = _train(capsys, TINY_CPU, "--resume", *_opts(pack, out, "run.max_steps=3", "run.log_every=2"))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["first_loss"] == first["first_loss"]
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 2 ended the first run and step 3 this one: both logged


# ----------------------------------------------------------------------------- finding 6: initial weights
def test_bundled_checkpoint_loads_the_shipped_weights_and_says_so(tmp_path: Path) -> None:
    from segany.checkpoints import build_sam, find_weights
    from segany.hashing import file_digest
    from segany.train.init_weights import describe_init

    cfg = load_config(FINETUNE, [f"run.out_dir={tmp_path}"])
    assert cfg.model.checkpoint == "bundled"
    tr = Trainer(cfg)
    shipped = find_weights("segany_tiny")
    assert tr.init_checkpoint == shipped
    ref = build_sam("segany_tiny", checkpoint=shipped)
    w = "mask_decoder.iou_token.weight"
    assert torch.equal(tr.sam.state_dict()[w], ref.state_dict()[w])
    assert file_digest(shipped)[:12] in describe_init(tr.init_checkpoint, True)
    assert describe_init(None, False).startswith("random init")


def test_unknown_model_name_is_refused_even_with_a_checkpoint(tmp_path: Path) -> None:
    from segany.checkpoints import find_weights

    with pytest.raises(UnknownModelError, match="vit_xx"):
        load_config(None, ["model.name=vit_xx", f"model.checkpoint={find_weights('segany_tiny')}"])
    with pytest.raises(CheckpointError, match="model 'vit_b' has no weights shipped with segany"):
        Trainer(load_config(None, ["model.name=vit_b", "model.checkpoint=bundled", f"run.out_dir={tmp_path}"]))


# ----------------------------------------------------------------------------- finding 7: data messages
def test_unknown_dataset_is_named_with_the_packs_datasets(pack: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_fails(["train", TINY_CPU, *_opts(pack, tmp_path / "r", "data.datasets=[foo]")], capsys, "foo")
    assert "mydata" in line and "data.datasets=[mydata]" in line
    # The fine-tune config's shared-dataset names on a user's pack: the names are the problem, say so.
    line = cli_fails(["train", FINETUNE, *_opts(pack, tmp_path / "r", mine=False)], capsys,
                     "none of data.datasets")
    assert "coco128" in line and "mydata" in line


def test_missing_pack_fails_before_the_model_is_built(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was built before the pack was checked")

    monkeypatch.setattr(Trainer, "__init__", no_model)
    cli_fails(["train", TINY_CPU, *_opts(tmp_path / "nope", tmp_path / "r")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    cli_fails(["train", TINY_CPU, *_opts(tmp_path / "empty", tmp_path / "r")], capsys, "not a segany pack")
    assert not (tmp_path / "r").exists()


def test_finetune_config_trains_on_a_users_pack(pack: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ft"
    code, err = _train(capsys, FINETUNE, *_opts(pack, out, "data.datasets=mydata", "run.max_steps=1",
                                                 "run.device=cpu"))
    assert code == 0, err
    assert "data.repeat entries for bsds, coco128, kvasir, pennfudan ignored" in err
    assert "initial weights: bundled" in err and "sha256" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


# ----------------------------------------------------------------------------- finding 8: validation
def test_validation_logs_metrics_and_keeps_best_weights(pack: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from segany.checkpoints import build_sam

    out = tmp_path / "val"
    code, err = _train(capsys, TINY_CPU, *_opts(pack, out, "run.max_steps=3", "run.val_every=2",
                                                "run.val_objects=2"))
    assert code == 0, err
    entries = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    val = [e for e in entries if "val_score" in e]
    assert [e["step"] for e in val] == [2, 3]  # every 2 steps, and the last
    assert all(0 <= e["val_box_miou"] <= 1 and 0 <= e["val_miou_1"] <= 1 and e["val_objects"] == 2 for e in val)
    best = max(val, key=lambda e: e["val_score"])
    model = build_sam("tiny_cpu", checkpoint=out / "best.pt")
    assert model.cfg.encoder.depth == 2
    meta = torch.load(out / "best_fp16.pt", map_location="cpu", weights_only=True).get("meta", {})
    assert meta.get("best_step", best["step"]) == best["step"]
    assert json.loads((out / "summary.json").read_text())["best_val_score"] == best["val_score"]


def test_validation_on_a_pack_without_held_out_images_fails_up_front(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from segany.data.pack import load_pack, pack_records

    src = _pack(tmp_path / "a")
    train_only = [("train", r) for r in load_pack(src, split="train")]
    pack_records(train_only, tmp_path / "b")
    cli_fails(["train", TINY_CPU, *_opts(tmp_path / "b", tmp_path / "r", "run.val_every=1")], capsys,
              "no held-out (val) images")


# ----------------------------------------------------------------------------- finding 9: config types
def test_bools_are_not_numbers_and_a_bare_dataset_is_a_list() -> None:
    with pytest.raises(InputError, match="run.batch_size must be int"):
        load_config(None, ["run.batch_size=true"])
    with pytest.raises(InputError, match="optim.lr must be float"):
        load_config(None, ["optim.lr=false"])
    assert load_config(None, ["data.datasets=foo"]).data.datasets == ("foo",)
    # A list where one value goes was accepted and crashed later ("TypeError: expected str ... not tuple").
    with pytest.raises(InputError, match=r"data.pack must be str, got \['a', 'b'\]; write one value, not a list"):
        load_config(None, ["data.pack=[a,b]"])
    with pytest.raises(InputError, match="run.max_steps must be int"):
        load_config(None, ["run.max_steps=[1]"])


def test_resume_refuses_a_pack_rebuilt_under_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The pack rebuilt with another split between a run and its resume: the resume would validate on images the
    run trained on, so it is refused naming the change; the same pack resumes."""
    own = _pack(tmp_path)
    out = tmp_path / "run"
    code, err = _train(capsys, TINY_CPU, *_opts(own, out, "run.max_steps=1"))
    assert code == 0, err
    _pack(tmp_path, n_train=4)  # the same folder rebuilt: 4 train images and 1 val
    line = cli_fails(["train", TINY_CPU, "--resume", *_opts(own, out, "run.max_steps=2")], capsys,
                     "changed since it started")
    assert "train: 3 images then, 4 now" in line and "val: 2 images then, 1 now" in line, line
    _pack(tmp_path)  # rebuilt as it was: the resume goes on
    code, err = _train(capsys, TINY_CPU, "--resume", *_opts(own, out, "run.max_steps=2"))
    assert code == 0, err


def test_the_torchrun_entry_prints_one_line_per_error(tmp_path: Path) -> None:
    """``python -m segany.cli.train`` (docs/cli.md's torchrun command) printed a traceback per process."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "segany.cli.train", TINY_CPU, "-o", f"data.pack={tmp_path / 'nope'}",
                        "-o", f"run.out_dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("segany: error: data.pack")


def test_a_pack_without_a_train_split_names_a_fix_that_works(pack: Path, tmp_path: Path) -> None:
    """It said "pass -o data.datasets=[]", which is refused itself."""
    from segany.train.data import _select

    with pytest.raises(InputError, match="its train split is empty: pack the data again with a smaller "
                                         "--val-fraction"):
        _select([], ["mine"], str(pack), "train")


def test_a_key_written_twice_in_a_config_is_refused_naming_its_line(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys: a second run: block replaced the first one's folder, steps and device.
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("model: {name: tiny_cpu}\nrun: {out_dir: a, max_steps: 1, device: cpu}\noptim: {lr: 3.0e-4}\n"
                   "run: {out_dir: b}\n")
    with pytest.raises(InputError, match=r"line 4, column 1: key 'run' appears twice \(first at line 2\)"):
        load_config(str(cfg))
    cfg.write_text("model: {name: tiny_cpu}\noptim: {lr: 3.0e-4, lr: 3.0e-1}\n")
    with pytest.raises(InputError, match=r"key 'lr' appears twice"):
        load_config(str(cfg))
    # An override's value is read the same way (it went through plain safe_load, keeping the last depth).
    with pytest.raises(InputError, match=r"override model.arch=.*key 'depth' appears twice"):
        load_config(str(REPO / "configs" / "tiny_cpu.yaml"), ["model.arch={encoder: {kind: vit, depth: 2, depth: 3}}"])
    # Overriding a key a "<<" merge brought in is what a merge is for, not a repeat.
    from segany.yaml_errors import safe_load_unique

    assert safe_load_unique("base: &b {steps: 10, device: cpu}\nrun: {<<: *b, steps: 20}\n")["run"] == \
        {"steps": 20, "device": "cpu"}


@pytest.mark.parametrize("arch,fragment", [
    ("foo", "model.arch must be a mapping"),
    ("{}", "model.arch needs an encoder section"),
    ("{encoder: {kind: tinyvit}}", "model.arch.encoder.kind must be one of vit, tiny_vit, got 'tinyvit'"),
    ("{encoder: {kind: vit}, decoder_depth: 3}", "model.arch has no setting 'decoder_depth'"),
    ("{encoder: {kind: vit, depht: 2}}", "model.arch.encoder has no setting 'depht'"),
    ("{encoder: {kind: vit}, decodr: {transformer_depth: 1}}", "model.arch has no setting 'decodr'"),
])
def test_a_mistyped_architecture_is_refused_not_trained(arch: str, fragment: str) -> None:
    # It built a default-size ViT (any kind but tiny_vit), dropped unknown sections, or crashed on a KeyError.
    with pytest.raises(InputError, match=re.escape(fragment)):
        load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [f"model.arch={arch}"])


def test_a_yes_no_setting_takes_only_yes_or_no() -> None:
    tiny = str(REPO / "configs" / "tiny_cpu.yaml")
    assert load_config(tiny, ["optim.freeze_image_encoder=1"]).optim.freeze_image_encoder is True
    for bad in ("2", "0.5"):  # a number meant "yes" before
        with pytest.raises(InputError, match="config optim.freeze_image_encoder must be bool"):
            load_config(tiny, [f"optim.freeze_image_encoder={bad}"])
