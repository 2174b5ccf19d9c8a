"""The training recipe on CPU: a step lowers the loss on a fixed batch; resuming reproduces the next loss."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from synthetic_records import synthetic_records

from segany.data.datasets import collate
from segany.data.formats.common import InstanceRecord
from segany.errors import InputError
from segany.modeling.sam import Sam
from segany.train.config import load_config
from segany.train.losses import dice_loss, focal_loss, mask_iou
from segany.train.optim import encoder_layer_id, lr_factor, param_groups
from segany.train.prompts import error_points, mask_boxes_xyxy, sample_points
from segany.train.trainer import Trainer

S = 128


def _cfg(tmp_path, *extra: str):
    return load_config(None, [f"run.out_dir={tmp_path}", "run.batch_size=1", "data.max_masks=2",
                              "data.num_workers=0", "recipe.point_rounds=1", "recipe.mask_only_rounds=0",
                              "recipe.loss_size=0", "optim.warmup_steps=0", "optim.lr=1e-3", "run.max_steps=3",
                              "run.log_every=1", "run.ckpt_every=0", *extra])


def _model(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    return Sam(tiny_config(img_size=S))


def _batch() -> dict:
    img = torch.randn(1, 3, S, S)
    masks = torch.zeros(1, 2, S, S, dtype=torch.bool)
    masks[0, 0, 20:70, 30:90] = True
    masks[0, 1, 80:120, 10:50] = True
    return {"image": img, "masks": masks, "num_masks": torch.tensor([2]), "size_hw": [(S, S)]}


def _records(tmp_path) -> list[InstanceRecord]:
    return synthetic_records(tmp_path)


def test_one_step_lowers_loss_on_fixed_batch(tmp_path) -> None:
    tr = Trainer(_cfg(tmp_path), sam=_model())
    batch = _batch()

    def loss_now() -> float:
        tr.step = 0  # same prompt draws before and after the update
        with torch.no_grad():
            return float(tr.compute_loss(batch)[0])

    before = loss_now()
    tr.train_step(batch)
    after = loss_now()
    assert after < before, (before, after)


def test_resume_reproduces_next_loss_exactly(tmp_path) -> None:
    recs = _records(tmp_path)
    a = Trainer(_cfg(tmp_path / "a", "run.max_steps=2"), sam=_model(), train_records=recs)
    a.fit()
    ckpt = a.save(tmp_path / "state.pt")
    a_cfg = _cfg(tmp_path / "a", "run.max_steps=3")
    a.cfg = a_cfg
    ref = a.fit()
    b = Trainer(a_cfg, sam=_model(seed=123), train_records=recs)  # other init: everything must come from the file
    b.load(ckpt)
    assert b.step == 2
    got = b.fit()
    assert got["last_loss"] == ref["last_loss"]
    for (k, v), (k2, v2) in zip(a.sam.state_dict().items(), b.sam.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_ckpt_minutes_saves_by_training_time(tmp_path, monkeypatch) -> None:
    # A save sized in steps costs a ViT-H run seconds of disk per save, whatever its steps take; run.ckpt_minutes
    # saves by the training clock instead (the `engine retrain` fine-tunes use it).
    from segany.train import trainer as trainer_mod

    recs = _records(tmp_path)
    clock = {"t": 1000.0}
    monkeypatch.setattr(trainer_mod.time, "time", lambda: clock["t"])
    saved: list[int] = []
    real_save = Trainer.save

    def spy(self, *args, **kwargs):
        saved.append(self.step)
        return real_save(self, *args, **kwargs)

    step = Trainer.train_step

    def a_minute_per_step(self, *args, **kwargs):
        clock["t"] += 60.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", spy)
    monkeypatch.setattr(Trainer, "train_step", a_minute_per_step)
    Trainer(_cfg(tmp_path / "a", "run.max_steps=5", "run.ckpt_minutes=2"), sam=_model(), train_records=recs).fit()
    # The clock read before step k says k-1 minutes: steps 3 and 5 reach 2 minutes since the last save; 5 is
    # saved again at the end of the run.
    assert saved == [3, 5, 5]
    saved.clear()
    Trainer(_cfg(tmp_path / "b", "run.max_steps=5"), sam=_model(), train_records=recs).fit()
    assert saved == [5]


def test_export_roundtrip_fp16(tmp_path) -> None:
    from segany.checkpoints import build_sam

    tr = Trainer(_cfg(tmp_path), sam=_model())
    path = tr.export(tmp_path / "m.pt")
    m = build_sam("ignored", checkpoint=path)
    assert m.cfg == tr.sam.cfg
    w = dict(m.named_parameters())["mask_decoder.iou_token.weight"]
    assert torch.allclose(w, tr.sam.mask_decoder.iou_token.weight.half().float())


def test_losses_and_prompts() -> None:
    t = torch.zeros(1, 8, 8)
    t[0, 2:6, 2:6] = 1
    good, bad = (t * 20 - 10), (-t * 20 + 10)
    assert focal_loss(good, t) < focal_loss(bad, t) and dice_loss(good, t) < dice_loss(bad, t)
    assert mask_iou(good, t).item() == 1.0 and mask_iou(bad, t).item() == 0.0
    gen = torch.Generator().manual_seed(0)
    xy, found = sample_points(t.bool(), gen)
    assert found.all() and t[0, int(xy[0, 1]), int(xy[0, 0])] == 1
    assert mask_boxes_xyxy(t.bool()).tolist() == [[2.0, 2.0, 5.0, 5.0]]
    pred = torch.zeros(2, 8, 8, dtype=torch.bool)
    pred[1, 0, 0] = True
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, 3, 4] = True
    xy, lab = error_points(pred, gt, gen)
    assert xy[0].tolist() == [4.0, 3.0] and lab.tolist() == [1, 0]
    _, lab = error_points(gt, gt, gen)
    assert lab.tolist() == [-1, -1]


def test_optim_groups_and_schedule() -> None:
    from segany.registry import get_config

    cfg = load_config(None, ["optim.layer_decay=0.5", "optim.warmup_steps=10", "optim.decay_at=[0.5]"]).optim
    model = Sam(tiny_config())
    groups = param_groups(model, cfg)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and scales[0] == 0.5 ** 3  # stem of a depth-2 ViT: 3 layers below the top
    assert encoder_layer_id("layers.2.blocks.3.attn.qkv.weight", get_config("segany_tiny").encoder) == (7, 12)
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1) and lr_factor(20, 0.4, cfg) == 1.0
    assert lr_factor(20, 0.6, cfg) == pytest.approx(0.1)
    frozen = load_config(None, ["optim.freeze_image_encoder=true"])
    assert frozen.optim.freeze_image_encoder is True


def test_config_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="section.key=value"):
        load_config(None, ["lr=3"])
    with pytest.raises(InputError, match="unknown keys"):
        load_config(None, ["optim.learning_rate=3"])
    with pytest.raises(InputError, match="optim.lr must be float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load() -> None:
    from conftest import REPO

    for p in sorted((REPO / "configs").glob("*.yaml")):
        load_config(p)


def test_collate_pads_num_masks() -> None:
    b = collate([_batch() | {"image": _batch()["image"][0], "masks": _batch()["masks"][0], "num_masks": 2}])
    assert b["image"].shape == (1, 3, S, S)


def test_repeat_config_checks_names_and_values() -> None:
    cfg = load_config(None, ["data.datasets=[bsds, kvasir]", "data.repeat={bsds: 4, kvasir: 0.5}"])
    assert cfg.data.repeat == {"bsds": 4.0, "kvasir": 0.5}
    # A name outside data.datasets is ignored with a note when the run starts (tests/train/test_finetune_ux.py).
    assert load_config(None, ["data.datasets=[bsds]", "data.repeat={coco: 2}"]).data.repeat == {"coco": 2.0}
    with pytest.raises(InputError, match=">= 0"):
        load_config(None, ["data.repeat={bsds: -1}"])


@pytest.mark.parametrize("override, fragment", [
    ("run.max_minutes=-1", "run.max_minutes"), ("run.max_minutes=0", "run.max_minutes"),
    ("run.max_steps=0", "run.max_steps must be >= 1"), ("run.batch_size=0", "run.batch_size must be >= 1"),
    ("run.log_every=0", "run.log_every"), ("run.ckpt_every=-1", "run.ckpt_every"), ("run.seed=-1", "run.seed"),
    ("run.ckpt_minutes=0", "run.ckpt_minutes must be > 0"),
    ("run.device=gpu", "run.device must be"), ("run.max_steps=null", "run.max_steps needs a value"),
    ("optim.lr=0", "optim.lr must be > 0"), ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number"), ("data.scale_max=.inf", "data.scale_max must be a finite"),
    ("data.repeat={bsds: .inf}", "data.repeat must be a finite"), ("optim.betas=[0.9, .nan]", "optim.betas must be a fi"),
    ("recipe.focal_weight=.inf", "recipe.focal_weight must be a finite"),
    ("run.seed=100000000000000", r"run.seed must be in \[0, 2\*\*32\)"),
    ("data.min_mask_area=0", "data.min_mask_area must be >= 1 pixel"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"), ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.betas=0.9", "optim.betas must be tuple"), ("optim.decay_at=[0, 2]", "optim.decay_at"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("recipe.box_prob=2", "recipe.box_prob"), ("recipe.point_rounds=-1", "recipe.point_rounds"),
    ("data.num_workers=-1", "data.num_workers"), ("data.hflip=1.5", "data.hflip"),
    ("data.datasets=[]", "data.datasets is empty"), ("optim.lr=[", "not valid YAML"),
])
def test_config_rejects_bad_budgets_and_ranges(override: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment if "\\" in fragment else fragment.replace("[", r"\[")):
        load_config(None, [override])


def test_config_file_that_is_not_yaml(tmp_path) -> None:
    from conftest import SAMPLE_IMAGE

    with pytest.raises(InputError, match="not a text file"):
        load_config(SAMPLE_IMAGE)
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [1\n")
    with pytest.raises(InputError, match="not valid YAML at line 2"):
        load_config(broken)
    with pytest.raises(InputError, match="is a folder"):
        load_config(tmp_path)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("run: 5\n")
    with pytest.raises(InputError, match="section 'run' must be a mapping"):
        load_config(scalar)


def _steps(log_path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in log_path.read_text().splitlines()]


def test_ctrl_c_saves_last_and_resume_keeps_one_log_history(tmp_path) -> None:
    import os
    import signal

    recs = _records(tmp_path)
    cfg = _cfg(tmp_path / "run", "run.max_steps=4")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when the runner runs in the background

    def interrupt_at_2(entry: dict) -> None:
        if entry["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C

    a = Trainer(cfg, sam=_model(), train_records=recs)
    with pytest.raises(KeyboardInterrupt):
        a.fit(on_log=interrupt_at_2)
    last = tmp_path / "run" / "last.pt"
    assert a.interrupt_checkpoint == last and last.exists()  # ckpt_every=0: only the interrupt saved it
    assert torch.load(last, weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    # A hard kill after the checkpoint leaves logged steps past it, and maybe a torn line.
    log_path = tmp_path / "run" / "log.jsonl"
    with open(log_path, "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    b = Trainer(cfg, sam=_model(seed=1), train_records=recs)
    b.load(last)
    b.fit()
    assert _steps(log_path) == [1, 2, 3, 4]
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_a_batch_the_crops_emptied_changes_nothing_and_does_not_crash(tmp_path) -> None:
    """Crops can cut every mask of a batch away (about 1 sample in 40 for coco128 at 256 px); that step used to
    crash on an assert. In one process it makes no update; under DDP its zero loss still reaches every trained
    parameter, so that process joins the others' gradient all-reduce."""
    tr = Trainer(_cfg(tmp_path), sam=_model())
    batch = _batch()
    batch["masks"][:] = False
    batch["num_masks"] = torch.tensor([0])
    before = {k: v.clone() for k, v in tr.sam.state_dict().items()}
    stats = tr.train_step(batch)
    assert tr.step == 1 and stats["masks"] == 0 and stats["loss"] == 0.0
    assert all(torch.equal(v, tr.sam.state_dict()[k]) for k, v in before.items())
    loss, _ = tr.net(batch["image"], torch.zeros(0, S, S, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                     tr.generator())
    loss.backward()
    trained = [p for p in tr.net.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and not p.grad.any() for p in trained)


def test_corrective_clicks_fall_on_the_image_not_its_padding(tmp_path, monkeypatch) -> None:
    """A user clicks on the picture; a prediction spilling into the zero padding must not draw clicks there."""
    import segany.train.trainer as trainer_module

    clicks = []
    real = trainer_module.error_points

    def spy(pred, gt, gen):
        xy, lab = real(pred, gt, gen)
        clicks.append((xy, lab))
        return xy, lab

    monkeypatch.setattr(trainer_module, "error_points", spy)
    tr = Trainer(_cfg(tmp_path, "recipe.point_rounds=4", "recipe.loss_size=0", "recipe.box_prob=0"), sam=_model())
    batch = _batch()
    h, w = 60, 44  # the image part of the 128 x 128 input; the rest is padding
    batch["image"][:, :, h:], batch["image"][:, :, :, w:] = 0, 0
    batch["masks"][:, :, h:], batch["masks"][:, :, :, w:] = False, False
    batch["size_hw"] = [(h, w)]
    with torch.no_grad():
        tr.compute_loss(batch)
    xy = torch.cat([c[0] for c in clicks])
    lab = torch.cat([c[1] for c in clicks])
    assert (lab == 0).sum() >= 3  # background clicks were drawn (the untrained model's masks spill widely)
    on_image = (xy[:, 0] < w) & (xy[:, 1] < h)
    assert on_image[lab >= 0].all(), xy[lab >= 0][~on_image[lab >= 0]]


def test_the_next_round_starts_from_the_mask_the_model_ranks_first(tmp_path) -> None:
    """SAM's recipe (and every click at inference) carries on from the mask with the highest predicted IoU;
    choosing the one closest to the ground truth gave later rounds a start inference never has."""
    tr = Trainer(_cfg(tmp_path, "recipe.box_prob=0"), sam=_model())
    head = tr.sam.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():  # output 3 always predicts the highest IoU
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    outputs, fed_back = [], []
    dec = tr.sam.mask_decoder
    real = dec.predict_masks

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out[0].detach())
        return out

    dec.predict_masks = record
    tr.sam.prompt_encoder.mask_downscaling.register_forward_pre_hook(lambda m, inp: fed_back.append(inp[0].detach()))
    with torch.no_grad():
        tr.compute_loss(_batch())
    assert len(outputs) == 2 and len(fed_back) == 1  # round 0, then round 1 with the mask fed back
    torch.testing.assert_close(fed_back[0], outputs[0][:, 3:4])


def test_resuming_on_another_kind_of_device_says_it_is_not_an_exact_continuation(tmp_path) -> None:
    recs = _records(tmp_path)
    a = Trainer(_cfg(tmp_path / "a", "run.max_steps=1"), sam=_model(), train_records=recs)
    a.fit()
    state = torch.load(a.save(), weights_only=True)
    assert state["device_type"] == "cpu"
    b = Trainer(_cfg(tmp_path / "a", "run.max_steps=2"), sam=_model(), train_records=recs)
    b.load(tmp_path / "a" / "last.pt")
    assert b.resume_notes == []  # the same kind of device: nothing to say
    state["device_type"] = "cuda"  # as if the run had started on a GPU
    torch.save(state, tmp_path / "a" / "last.pt")
    b.load(tmp_path / "a" / "last.pt")
    assert len(b.resume_notes) == 1 and "trained on cuda and continues on cpu" in b.resume_notes[0]


def test_initial_weights_of_another_architecture_are_refused(tmp_path) -> None:
    """build_sam takes a file's own config over model.name's, so a tiny ViT file trained as "segany_tiny" (a
    TinyViT): banner, config.json and every later eval named the wrong model."""
    from segany.checkpoints import build_sam, find_weights, save_checkpoint
    from segany.train.trainer import check_init_architecture

    vit = save_checkpoint(_model(), tmp_path / "vit.pt")
    with pytest.raises(InputError, match=r"holds a ViT model \(128 px, depth 2, width 96\), but model.name "
                                         r"'segany_tiny' is a tiny_vit model"):
        Trainer(load_config(None, ["model.name=segany_tiny", f"model.checkpoint={vit}", f"run.out_dir={tmp_path}"]))
    shipped = find_weights("segany_tiny")
    check_init_architecture("segany_tiny", shipped, build_sam("segany_tiny", shipped).cfg)  # its own weights: fine


def test_initial_weights_of_another_model_name_the_train_option(tmp_path) -> None:
    """An official-layout file of another model: the command-line fix said `use --model segany_tiny`, a flag
    `segany train` does not have; it names `-o model.name=...` now, and Python callers keep the Python call."""
    from segany.checkpoints import build_sam, find_weights
    from segany.errors import CheckpointError

    plain = tmp_path / "plain.pth"  # no embedded config: the name decides the architecture
    torch.save(build_sam("segany_tiny", find_weights("segany_tiny")).state_dict(), plain)
    with pytest.raises(CheckpointError) as info:
        Trainer(load_config(None, ["model.name=vit_b", f"model.checkpoint={plain}", f"run.out_dir={tmp_path}"]))
    guess = info.value.looks_like
    assert guess in ("segany_tiny", "vit_t")
    assert info.value.cli_message().endswith(f"train that model: -o model.name={guess}")
    assert "--model" not in info.value.cli_message() and f"build_sam({guess!r}" in str(info.value)


def test_the_log_keeps_small_learning_rates(tmp_path) -> None:
    """Stats were rounded to 5 decimals: warm-up learning rates of 2e-6 and 4e-6 were logged as 0.0."""
    import json

    cfg = _cfg(tmp_path, "optim.lr=2e-5", "optim.warmup_steps=10", "run.max_steps=2")
    Trainer(cfg, sam=_model(), train_records=_records(tmp_path)).fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-6, 4e-6], rel=1e-5)


def test_resume_with_another_process_count_is_refused_and_a_finished_run_keeps_its_loss(tmp_path) -> None:
    """Resuming a 2-process run in one process was accepted silently (global batch halved, data order moved,
    images_seen wrong); resuming a finished run wrote last_loss null into its summary."""
    from segany.errors import CheckpointError

    recs = _records(tmp_path)
    a = Trainer(_cfg(tmp_path / "a", "run.max_steps=1"), sam=_model(), train_records=recs)
    done = a.fit()
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert state["world_size"] == 1 and done["last_loss"] is not None
    again = Trainer(_cfg(tmp_path / "a", "run.max_steps=1"), sam=_model(), train_records=recs)
    again.load(tmp_path / "a" / "last.pt")
    assert again.fit()["last_loss"] == done["last_loss"]  # no step to run: the run's own last loss
    state["world_size"] = 2
    torch.save(state, tmp_path / "a" / "last.pt")
    with pytest.raises(CheckpointError, match=r"trained by 2 process\(es\) and this resume runs 1.*"
                                              "torchrun --nproc-per-node 2"):
        again.load(tmp_path / "a" / "last.pt")


def test_a_config_without_pyyaml_names_the_extra_to_install(tmp_path, monkeypatch) -> None:
    """Docs audit: `segany train` without pyyaml failed with 'unexpected error: ModuleNotFoundError'."""
    import sys

    from segany.errors import MissingDependencyError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  max_steps: 1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'segany\[train\]'"):
        load_config(str(cfg), [])
