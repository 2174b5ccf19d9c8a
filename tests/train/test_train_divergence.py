"""A fine-tune that goes wrong says so: a NaN loss stops the run and no NaN weights or JSON are written, out-of-range
settings are refused up front, the starting weights must be beaten to write best.pt, and --resume without a
checkpoint is refused. (Audit of fine-tuning on user data: lr=1e6 exported a NaN model with rc 0; a fine-tune
whose every step scored below its start still "saved best.pt".)"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import SAMPLE_IMAGE, cli_fails, tiny_config
from synthetic_records import synthetic_records

from segany.errors import InputError, SeganyError
from segany.modeling.sam import Sam
from segany.train.config import ModelSection, load_config
from segany.train.trainer import Trainer

S = 128


def _cfg(tmp_path, *extra: str):
    return load_config(None, [f"run.out_dir={tmp_path}", "run.batch_size=1", "data.max_masks=1",
                              "data.num_workers=0", "recipe.point_rounds=0", "recipe.mask_only_rounds=0",
                              "recipe.loss_size=0", "optim.warmup_steps=0", "run.log_every=1", "run.ckpt_every=0",
                              *extra])


def _model(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    return Sam(tiny_config(img_size=S))


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_nan_loss_stops_the_run_and_no_nan_weights_are_written(tmp_path) -> None:
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, "run.max_steps=4", "run.ckpt_every=1"), sam=_model(),
                 train_records=synthetic_records(tmp_path))
    real = tr.compute_loss

    def nan_from_step_2(batch):
        loss, stats = real(batch)
        return (loss * float("nan") if tr.step >= 1 else loss), stats

    tr.compute_loss = nan_from_step_2  # type: ignore[method-assign]
    with pytest.raises(SeganyError, match=r"diverged at step 2: the loss \(nan\) is not finite.*optim.lr=0.0001"
                                            r".*last.pt \(step 1\): --resume") as info:
        tr.fit()
    assert type(info.value).__name__ == "TrainingError" and "lower it" in str(info.value)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1  # the last good state, not overwritten
    assert all(v.isfinite().all() for v in tr.sam.state_dict().values())  # stopped before the update
    assert [e["step"] for e in _log(out / "log.jsonl")] == [1]
    assert not (out / "model_fp16.pt").exists() and not (out / "summary.json").exists()

    with torch.no_grad():  # weights that went non-finite anyway are never written
        tr.sam.mask_decoder.iou_token.weight[0, 0] = float("inf")
    for write in (tr.save, lambda: tr.export(out / "m.pt")):
        with pytest.raises(SeganyError, match=r"not writing .*1 weight tensor\(s\) .* hold NaN or inf "
                                                r"\(first: mask_decoder.iou_token.weight\)"):
            write()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1 and not (out / "m.pt").exists()


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=1e6", "optim.lr must be > 0 and <= 1, got 1e+06; e.g. optim.lr=3e-4"),
    ("data.scale_max=1e6", "data.scale_max must be <= 10 (the image is resized by at most this before the crop), "
                           "got 1e+06; e.g. data.scale_max=1.5"),
    ("data.max_masks=1000000000", "data.max_masks must be in [1, 1024] masks per image, got 1000000000; e.g."),
    ("recipe.point_rounds=1000000", "recipe.point_rounds must be <= 64 corrective-click rounds, got 1000000; e.g."),
    ("optim.decay_gamma=10", "optim.decay_gamma is the factor lr is multiplied by at each optim.decay_at and must be "
                             "in (0, 1], got 10; e.g. optim.decay_gamma=0.1"),
])
def test_out_of_range_settings_are_refused_naming_key_value_and_an_example(override: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_warmup_longer_than_the_run_is_warned() -> None:
    from segany.train.config import config_warnings

    notes = config_warnings(load_config(None, ["optim.warmup_steps=20", "run.max_steps=20"]))
    assert len(notes) == 1 and "optim.warmup_steps=20 >= run.max_steps=20" in notes[0]
    assert config_warnings(load_config(None, ["optim.warmup_steps=5", "run.max_steps=20"])) == []


def test_a_fine_tune_must_beat_its_starting_weights_to_write_best_and_a_resume_keeps_their_score(
        tmp_path, monkeypatch) -> None:
    """Validation is faked (scores by call) so the test runs two real steps and no evaluation."""
    import segany.eval.interactive as interactive
    from segany.checkpoints import save_checkpoint

    scores = iter([0.9, 0.5, 0.95])  # the start, step 2, step 3 (after the resume)
    calls = []

    def fake_summarize(results, max_clicks=1):
        s = next(scores)
        calls.append(s)
        return {"all": {"box_miou": s, "miou_1": s}}

    monkeypatch.setattr(interactive, "evaluate_model", lambda *a, **k: [object()] * 3)
    monkeypatch.setattr(interactive, "summarize", fake_summarize)
    monkeypatch.setattr(Trainer, "validation_objects", lambda self: [(None, [1, 2, 3])])
    start = save_checkpoint(_model(), tmp_path / "start.pt")
    model = ModelSection(name="mine", checkpoint=str(start), arch=tiny_config(img_size=S).to_dict())
    recs = synthetic_records(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.x1y2.tmp").write_bytes(b"torn")  # a kill during an earlier save left it
    (out / ".notes.txt.k.tmp").write_bytes(b"not ours")

    def trainer(max_steps: int) -> Trainer:
        cfg = _cfg(out, f"run.max_steps={max_steps}", "run.val_every=2")
        return Trainer(dataclasses.replace(cfg, model=model), train_records=recs)

    a = trainer(2)
    summary = a.fit()
    val = [e for e in _log(out / "log.jsonl") if "val_score" in e]
    assert [(e["step"], e["val_score"], e.get("base"), e.get("best")) for e in val] == [
        (0, 0.9, True, None), (2, 0.5, None, None)]
    assert not (out / "best.pt").exists()  # no step beat the start
    assert summary["base_val_score"] == 0.9 and summary["best_val_score"] == 0.5
    assert summary["no_improvement"].startswith("no step beat the starting weights (val 0.9000 vs best 0.5000)")
    assert "try a lower optim.lr or more data" in summary["no_improvement"]

    b = trainer(3)
    b.load(out / "last.pt")
    summary = b.fit()
    assert calls == [0.9, 0.5, 0.95]  # the start was not validated again
    assert summary["base_val_score"] == 0.9 and "no_improvement" not in summary
    assert torch.load(out / "best.pt", weights_only=True)["meta"]["best_step"] == 3
    assert [e["step"] for e in _log(out / "log.jsonl") if "val_score" in e] == [0, 2, 3]
    assert "only 3 object(s)" in (b.validation_note() or "")  # best.pt chosen on noise: `segany train` says so
    assert not (out / ".last.pt.x1y2.tmp").exists() and (out / ".notes.txt.k.tmp").exists()


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    cli_fails(["train", "-o", f"run.out_dir={out}", "--resume"], capsys,
              f"no last.pt in {out}: nothing to resume; drop --resume to start a new run")
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]


def test_predict_refuses_to_write_a_nan_score(tmp_path, capsys) -> None:
    from segany.checkpoints import save_checkpoint

    sam = _model()
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(float("nan"))
    ckpt = save_checkpoint(sam, tmp_path / "nan.pt")
    out = tmp_path / "pred"
    cli_fails(["predict", str(SAMPLE_IMAGE), "--point", "40,40", "--checkpoint", str(ckpt), "--out", str(out),
               "--quiet"], capsys, "predicted non-finite scores (nan, nan, nan)")
    assert not out.exists() or list(out.iterdir()) == []


def test_a_nan_gradient_stops_the_run_with_clipping_off(tmp_path) -> None:
    """optim.grad_clip=0 (no clipping) computed no gradient norm, so a finite loss with a NaN gradient (an inf
    in the backward pass) reached the weights; the norm is computed for the check all the same."""
    tr = Trainer(_cfg(tmp_path / "run", "run.max_steps=2", "optim.grad_clip=0"), sam=_model(),
                 train_records=synthetic_records(tmp_path))
    tr.sam.mask_decoder.iou_token.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(SeganyError, match=r"diverged at step 1: the gradient norm \(nan\) is not finite"):
        tr.fit()
    assert all(v.isfinite().all() for v in tr.sam.state_dict().values())


def test_a_fresh_start_drops_a_killed_runs_base_line(tmp_path) -> None:
    """A run killed before its first checkpoint left its step-0 base score in log.jsonl; a fresh rerun (maybe
    from other weights) kept it beside its own."""
    from segany.train.trainer import trim_log

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0, "val_score": 0.7, "base": true}\n{"step": 1, "loss": 2.0}\n')
    tr = Trainer(_cfg(out, "run.max_steps=1"), sam=_model(), train_records=synthetic_records(tmp_path))
    tr.fit()
    assert [e["step"] for e in _log(out / "log.jsonl")] == [1] and "base" not in _log(out / "log.jsonl")[0]
    assert trim_log(out / "log.jsonl", 5) == 0  # a resume keeps its own history


def test_retrain_refuses_an_lr_above_the_trainers_bound_up_front() -> None:
    from segany.engine.retrain import RetrainSettings

    with pytest.raises(InputError, match=r"^--lr must be > 0 and <= 1 \(e.g. 1e-4\), got 2"):
        RetrainSettings(lr=2.0)


def test_a_runs_end_scans_its_weights_once_and_scans_them_again_once_changed(tmp_path, monkeypatch) -> None:
    """Validation, best.pt, best_fp16.pt, last.pt and the CLI's export all check the same weights: one scan (each
    was one, with a device sync per tensor); an in-place edit at the same step is scanned again and refused."""
    import segany.eval.interactive as interactive

    monkeypatch.setattr(interactive, "evaluate_model", lambda *a, **k: [object()] * 3)
    monkeypatch.setattr(interactive, "summarize", lambda results, max_clicks=1: {"all": {"box_miou": 0.5,
                                                                                        "miou_1": 0.5}})
    monkeypatch.setattr(Trainer, "validation_objects", lambda self: [(None, [1, 2, 3])])
    out = tmp_path / "run"
    tr = Trainer(_cfg(out, "run.max_steps=1", "run.val_every=1"), sam=_model(),
                 train_records=synthetic_records(tmp_path))
    scans: list[int] = []
    real = Trainer.nonfinite_weights
    monkeypatch.setattr(Trainer, "nonfinite_weights", lambda self, *a: scans.append(self.step) or real(self, *a))
    tr.fit()
    tr.export(out / "model_fp16.pt")
    assert scans == [1]
    assert all((out / name).is_file() for name in ("best.pt", "best_fp16.pt", "last.pt", "model_fp16.pt"))
    with torch.no_grad():
        tr.sam.mask_decoder.iou_token.weight[0, 0] = float("nan")
    with pytest.raises(SeganyError, match=r"1 weight tensor\(s\) at step 1 hold NaN .*iou_token.weight"):
        tr.save()
    assert scans == [1, 1]


def test_the_weight_scan_reads_the_device_once_and_names_the_bad_tensors_in_order(tmp_path, monkeypatch) -> None:
    tr = Trainer(_cfg(tmp_path), sam=_model(), train_records=[])
    state = tr.sam.state_dict()
    floats = [k for k, v in state.items() if v.is_floating_point()]
    bad = [floats[0], floats[len(floats) // 2], floats[-1]]
    with torch.no_grad():
        for k, value in zip(bad, (float("nan"), float("inf"), float("-inf")), strict=True):
            state[k].view(-1)[-1] = value
    reads: list[str] = []
    for name in ("__bool__", "item", "tolist"):  # each one a device sync on a GPU
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, _name=name: reads.append(_name) or _real(self, *a))
    found = tr.nonfinite_weights()
    monkeypatch.undo()
    assert found == bad and len(reads) == 1, reads
