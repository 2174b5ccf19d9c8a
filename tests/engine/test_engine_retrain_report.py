"""Retraining loop on real images and masks (PennFudanPed) and the maintenance report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_fixtures import SHARED_DATA, make_project, save_tiny_checkpoint

from segany.engine.masks import decode_rle


@pytest.fixture(scope="module")
def pennfudan_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _pennfudan(tmp_path_factory.mktemp("retrain"))


@pytest.fixture
def fresh_project(tmp_path: Path) -> Iterator[dict]:
    """:func:`pennfudan_project` of this test alone (the report test demotes masks of the shared one)."""
    made = _pennfudan(tmp_path / "project")
    yield made
    made["store"].close()


def _pennfudan(root: Path, n: int = 4) -> dict:
    """``n`` PennFudan images with their pedestrian masks stored as accepted manual annotations."""
    from segany.data.formats import read_shared

    split = read_shared("pennfudan", SHARED_DATA, limit=4)
    recs = (split["train"] + split["val"])[:n]
    assert len(recs) == n, f"PennFudanPed not found under {SHARED_DATA}"
    store, proj = make_project(root / "proj", [r.image_path for r in recs])
    ids = {im["file_name"]: im["id"] for im in store.list_images(proj["id"])}
    annotator = store.add_annotator("alice") and store.list_annotators()[0]["id"]
    for rec in recs:
        for k, rle in enumerate(rec.masks):
            store.save_annotation(ids[Path(rec.image_path).name], mask=decode_rle(rle), source="manual",
                                  annotator_id=annotator, seconds_spent=20.0 + k, label="person")
    ckpt = save_tiny_checkpoint(root / "tiny.pt")
    return {"root": root, "store": store, "proj": proj, "ckpt": ckpt}


@pytest.mark.slow
def test_retrain_registers_new_version_with_held_out_metrics(pennfudan_project: dict) -> None:
    from segany.engine.retrain import RetrainSettings, current_model, freeze_dataset_version, retrain

    store, ckpt = pennfudan_project["store"], pennfudan_project["ckpt"]
    settings = RetrainSettings(steps=2, batch_size=1, held_out=0.25, max_objects=2, device="cpu",
                               always_promote=True)
    result = retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt),
                     out_dir=str(pennfudan_project["root"] / "run"))
    dv = result["dataset_version"]
    assert len(dv["content_hash"]) == 64 and dv["annotations"] > 0
    # Freezing the same data again gives the same version (reproducible).
    assert freeze_dataset_version(store, None, held_out=0.25)["id"] == dv["id"]
    versions = {m["id"]: m for m in store.list_model_versions()}
    new = versions[result["model_version"]["id"]]
    assert new["parent_id"] == result["model_version"]["parent_id"] and new["trained_on_id"] == dv["id"]
    for key in ("miou_1", "miou_5", "box_miou"):
        assert 0.0 <= new["meta"]["metrics"]["all"][key] <= 1.0
        assert 0.0 <= new["meta"]["parent_metrics"]["all"][key] <= 1.0
    assert new["meta"]["metrics"]["all"]["objects"] >= 1
    assert new["meta"]["eval_split"] == "held-out project images"
    # The held-out image is a real PennFudan image and was not trained on.
    meta = _dv_meta(store, dv["id"])
    assert meta["held_out_image_ids"] and not set(meta["held_out_image_ids"]) & set(meta["train_image_ids"])
    assert result["train"]["steps"] == 2
    assert Path(result["model_version"]["checkpoint"]).is_file()
    assert current_model(store, None)["id"] == new["id"]  # promoted: serve/auto now load it


def _dv_meta(store, dv_id: int) -> dict:
    from segany.engine.db import DatasetVersion

    with store.transaction() as s:
        return dict(s.get(DatasetVersion, dv_id).meta)


def test_report_writes_html_and_flags_review_queue(pennfudan_project: dict, tmp_path: Path) -> None:
    from segany.engine.auto import ModelSpec
    from segany.engine.report import ReportSettings, build_report

    store, proj = pennfudan_project["store"], pennfudan_project["proj"]
    first = store.list_annotations(project_id=proj["id"], states=["accepted"])[0]
    dup, _ = store.save_annotation(first["image_id"], rle=first["segmentation"], source="manual",
                                   seconds_spent=5.0)  # an exact duplicate mask
    spec = ModelSpec("vit_b", str(pennfudan_project["ckpt"]), "cpu")
    out = build_report(store, None, tmp_path / "report", ReportSettings(disagreement_iou=0.05, max_disagreement=6, demote=True),
                       spec=spec)
    html = Path(out["html"]).read_text()
    assert "Review candidates" in html and "current annotations" in html
    assert (tmp_path / "report" / "live_distributions.png").stat().st_size > 1000
    assert (tmp_path / "report" / "throughput.png").is_file()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["versions"][0]["masks"] >= 5 and report["throughput"][0]["seconds_per_mask"] > 0
    flags = json.loads((tmp_path / "report" / "flags.json").read_text())["masks"]
    assert any(f["reason"] == "duplicate_mask" and f["annotation_id"] == dup["id"] for f in flags)
    assert store.get_annotation(dup["id"])["review_state"] == "pending"  # in the app's review queue
    assert out["flagged"] >= 1
    # Images of one scene with the same content would be near-duplicates; distinct PennFudan images are not.
    assert report["image_flags"] == []


def test_a_retrain_refused_before_training_leaves_no_version_behind(pennfudan_project: dict,
                                                                    tmp_path: Path) -> None:
    # Each of these refusals used to come after the dataset version was frozen and the parent registered: the
    # project gained a numbered version (in `versions`, reports, exports) for a run that never trained.
    from segany.engine.retrain import RetrainSettings, retrain
    from segany.engine.versions import list_versions
    from segany.errors import InputError

    store, ckpt = pennfudan_project["store"], pennfudan_project["ckpt"]
    before = (list_versions(store, None), store.list_model_versions())
    bad_data = RetrainSettings(steps=1, batch_size=1, device="cpu", eval_data=str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"pass --eval-data out/packed or --eval-data"):
        retrain(store, None, bad_data, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "run"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="already holds a retrained model.pt"):
        retrain(store, None, RetrainSettings(steps=1, batch_size=1, device="cpu"), model="vit_b",
                checkpoint=str(ckpt), out_dir=str(tmp_path / "used"))
    assert (list_versions(store, None), store.list_model_versions()) == before


def test_eval_datasets_without_eval_data_is_refused() -> None:
    from segany.engine.retrain import RetrainSettings
    from segany.errors import InputError

    with pytest.raises(InputError, match="--eval-datasets picks datasets of --eval-data"):
        RetrainSettings(eval_datasets=("foo",))
    assert RetrainSettings(eval_datasets=("foo",), eval_data="pack").eval_datasets == ("foo",)


def test_held_out_beside_eval_data_is_refused() -> None:
    # --held-out was ignored beside --eval-data (every project image trained), and its default of 0.2 hid that.
    from segany.engine.retrain import DEFAULT_HELD_OUT, RetrainSettings
    from segany.errors import InputError

    with pytest.raises(InputError, match="--held-out splits the project's images .* pass one of them"):
        RetrainSettings(held_out=0.3, eval_data="pack")
    assert RetrainSettings(eval_data="pack").held_out_fraction == 0.0
    assert RetrainSettings().held_out_fraction == DEFAULT_HELD_OUT == 0.2
    assert RetrainSettings(held_out=0.0, eval_data="pack").held_out_fraction == 0.0  # says the same: allowed
    with pytest.raises(InputError, match="--held-out 0 holds no image out"):  # refused after the freeze before
        RetrainSettings(held_out=0.0)


def _weights(path: str) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_an_interrupted_retrain_continues_where_it_stopped(fresh_project: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # An interrupted retrain trained from step 1 again when rerun; now it continues from the saved state, and
    # its weights come out as an uninterrupted run's.
    import os
    import signal

    import torch

    from segany.engine.retrain import RetrainSettings, retrain
    from segany.train.trainer import Trainer

    store, ckpt = fresh_project["store"], fresh_project["ckpt"]
    settings = RetrainSettings(steps=4, batch_size=1, held_out=0.25, max_objects=2, device="cpu")
    whole = retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "whole"))

    step = Trainer.train_step

    def ctrl_c_after_step_2(self: Trainer, *args: object, **kwargs: object) -> dict:
        stats = step(self, *args, **kwargs)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: the trainer finishes the step and saves
        return stats

    said: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_after_step_2)
        with pytest.raises(KeyboardInterrupt):
            retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "cut"),
                    log=said.append)
    assert any("interrupted at step 2 of 4" in s and "continues from it" in s for s in said), said
    assert (tmp_path / "cut" / "run" / "last.pt").is_file() and not (tmp_path / "cut" / "model.pt").exists()

    trained: list[int] = []
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", lambda self, *a, **k: (trained.append(self.step), step(self, *a, **k))[1])
        said.clear()
        again = retrain(store, None, settings, model="vit_b", checkpoint=str(ckpt), out_dir=str(tmp_path / "cut"),
                        log=said.append)
    assert trained == [2, 3], "the rerun trained steps it had already done"
    assert any("continuing the interrupted fine-tune" in s for s in said), said
    assert again["train"]["steps"] == 4 and again["dataset_version"]["id"] == whole["dataset_version"]["id"]
    a, b = _weights(whole["model_version"]["checkpoint"]), _weights(again["model_version"]["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "cut" / "run").glob("*.pt")), "the training states outlived the registered model"


def test_only_the_same_fine_tune_is_continued(fresh_project: dict, tmp_path: Path) -> None:
    # A rerun continues only the same fine-tune: other settings (--steps 600 after a kill at step 800 of 1000
    # trained nothing and registered "600 steps"), or another parent in a reused --out (its state was
    # continued and registered under the new parent), start over, saying why in the retrain's own flags.
    from conftest import randomize_, tiny_config

    from segany.checkpoints import save_checkpoint
    from segany.engine.retrain import RetrainSettings, retrain
    from segany.modeling.sam import Sam
    from segany.train.trainer import Trainer

    store, ckpt = fresh_project["store"], fresh_project["ckpt"]
    other = save_checkpoint(randomize_(Sam(tiny_config()), seed=7).eval(), tmp_path / "other.pt")
    first = RetrainSettings(steps=2, batch_size=1, held_out=0.25, max_objects=2, device="cpu")
    step = Trainer.train_step

    def stop_after_step_1(self: Trainer, *args: object, **kwargs: object) -> dict:
        step(self, *args, **kwargs)
        self.save()  # what the periodic save leaves behind a kill -9
        raise RuntimeError("killed")

    def killed_run(out: Path, checkpoint: Path = ckpt) -> None:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Trainer, "train_step", stop_after_step_1)
            with pytest.raises(RuntimeError, match="killed"):
                retrain(store, None, first, model="vit_b", checkpoint=str(checkpoint), out_dir=str(out))
        assert (out / "run" / "last.pt").is_file()

    def rerun(settings: RetrainSettings, out: Path, checkpoint: Path = ckpt) -> tuple[dict, str]:
        said: list[str] = []
        result = retrain(store, None, settings, model="vit_b", checkpoint=str(checkpoint), out_dir=str(out),
                         log=said.append)
        (why,) = [s for s in said if "not continuing the earlier fine-tune" in s and "starting it over" in s]
        return result, why

    killed_run(tmp_path / "a")
    other_settings = RetrainSettings(steps=3, batch_size=1, held_out=0.25, max_objects=2, device="cpu", lr=3e-5)
    result, why = rerun(other_settings, tmp_path / "a")
    assert "it ran with other --lr, --steps" in why and result["train"]["steps"] == 3

    killed_run(tmp_path / "b", checkpoint=other)
    result, why = rerun(first, tmp_path / "b")
    assert "it fine-tuned another model (vit_b:" in why and result["train"]["steps"] == 2
    assert result["model_version"]["parent_id"] != result["model_version"]["id"]


def test_a_split_with_an_empty_side_is_refused_before_a_version_is_frozen(tmp_path: Path) -> None:
    # It was refused after the freeze: the project gained a numbered version for a run that never trained.
    from segany.engine.retrain import RetrainSettings, retrain
    from segany.engine.versions import list_versions
    from segany.errors import InputError

    one = _pennfudan(tmp_path / "one", n=1)  # a single image cannot be on both sides
    store = one["store"]
    try:
        with pytest.raises(InputError, match="no held-out images to evaluate on; raise --held-out"):
            retrain(store, None, RetrainSettings(steps=1, batch_size=1, device="cpu"), model="vit_b",
                    checkpoint=str(one["ckpt"]), out_dir=str(tmp_path / "run"))
        assert list_versions(store, None) == [] and store.list_model_versions() == []
    finally:
        store.close()
