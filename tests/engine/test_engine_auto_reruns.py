"""Stage 3 reruns: --redo after people kept masks, two projects sharing an image, changed settings, an
interrupted --redo, unreadable images, one run per project, worker counts checked first."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import (
    auto_settings,
    make_images,
    make_project,
    save_tiny_checkpoint,
    use_test_generator_path,
)

from segany.engine.auto import ModelSpec, count_sets, run_auto


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    use_test_generator_path()
    root = tmp_path_factory.mktemp("reruns")
    return {"ckpt": save_tiny_checkpoint(root / "tiny.pt"), "images": make_images(root / "images", 3)}


@pytest.fixture
def project(base: dict, tmp_path: Path) -> tuple:
    store, proj = make_project(tmp_path / "proj", base["images"][:2])
    yield store, proj, ModelSpec("vit_b", str(base["ckpt"]), "cpu", precision="fp32")
    store.close()


def _ran(settings):
    """``settings`` as run_auto records them with the fixture's fp32 model (the precision that ran is a setting)."""
    return dataclasses.replace(settings, precision="fp32")


def _hashes(store, project_id: int) -> set[str | None]:
    from sqlalchemy import select

    from segany.engine.db import Image, ImageRun

    with store.transaction() as s:
        return set(s.scalars(select(ImageRun.settings_hash).join(Image, Image.id == ImageRun.image_id)
                             .where(Image.project_id == project_id)))


def test_redo_keeps_accepted_machine_masks_and_gives_new_ids(project: tuple) -> None:
    store, proj, spec = project
    assert run_auto(store, None, spec, auto_settings()).masks_written > 0
    store.add_annotator("rev", "reviewer")
    kept = store.list_annotations(project_id=proj["id"], sources=["auto"])[0]
    store.update_annotation(kept["id"], review_state="accepted", by=store.list_annotators()[0]["id"])

    again = run_auto(store, None, spec, auto_settings(), redo=True)  # was IntegrityError: annotations.uuid
    assert again.images_written == 2
    anns = store.list_annotations(project_id=proj["id"], sources=["auto"])
    assert kept["uuid"] in {a["uuid"] for a in anns}
    assert len({a["uuid"] for a in anns}) == len(anns) == again.masks_written + 1


def test_two_projects_holding_the_same_image(project: tuple) -> None:
    store, proj, spec = project
    second = store.create_project("second")
    store.add_images(second["id"], [im["path"] for im in store.list_images(proj["id"])])
    first = run_auto(store, None, spec, auto_settings())
    other = run_auto(store, "second", spec, auto_settings())  # was IntegrityError: annotations.uuid
    assert other.images_written == first.images_written == 2 and other.masks_written == first.masks_written
    assert all(n == m for n, m in count_sets(store, second["id"]).values())


def test_rerun_with_other_settings_refuses_and_points_to_redo(project: tuple) -> None:
    from segany.engine.auto import SettingsMismatchError

    store, proj, spec = project
    a, b = auto_settings(), dataclasses.replace(auto_settings(), max_masks=2)
    run_auto(store, None, spec, a)
    with pytest.raises(SettingsMismatchError, match=r"2 images were done with other settings \(max_masks "
                       rf"{a.max_masks!r} -> 2\); pass redo=True") as refused:  # names the change, not two hashes
        run_auto(store, None, spec, b)  # was: "2 already done", rc 0, nothing changed
    assert "--redo" not in str(refused.value) and "; pass --redo to redo them" in refused.value.cli_message()
    assert run_auto(store, None, spec, a).images_skipped == 2  # the same settings still resume
    done = run_auto(store, None, spec, b, redo=True)
    assert done.images_written == 2 and _hashes(store, proj["id"]) == {_ran(b).digest()}


def test_rerun_with_other_weights_keeps_done_images_and_says_so(project: tuple, tmp_path: Path) -> None:
    """A model `retrain` promoted gets only the images not done yet (the data engine's loop), and the run says
    how many images keep the earlier model's masks and that --redo redoes them; each mask records its model.
    The same weights under another file or model name are the same model and are not mentioned."""
    import shutil

    from conftest import randomize_, tiny_config

    from segany.checkpoints import save_checkpoint
    from segany.engine.versions import model_version_name
    from segany.modeling.sam import Sam

    store, proj, spec = project
    first = run_auto(store, None, spec, auto_settings())
    assert first.kept_other_model == 0 and first.other_model is None
    other = save_checkpoint(randomize_(Sam(tiny_config()), seed=5).eval(), tmp_path / "retrained.pt")
    summary = run_auto(store, None, dataclasses.replace(spec, checkpoint=str(other)), auto_settings())
    assert (summary.images_skipped, summary.images_written, summary.kept_other_model) == (2, 0, 2)
    assert summary.other_model == f"{model_version_name('vit_b', spec.checkpoint)} from {spec.checkpoint}"
    assert summary.model_version_id != first.model_version_id
    from segany.cli.engine import _kept_other_model_line

    assert _kept_other_model_line(summary) == (
        f"  2 images already done keep the masks of {summary.other_model}; pass --redo to redo them with this model")
    same = shutil.copy(spec.checkpoint, tmp_path / "copy.pt")
    again = run_auto(store, None, ModelSpec("segany_tiny", str(same), "cpu", precision="fp32"), auto_settings())
    assert (again.images_skipped, again.images_written, again.kept_other_model) == (2, 0, 0)



def test_interrupted_redo_is_finished_by_the_next_run(project: tuple) -> None:
    from segany.engine.auto import SettingsMismatchError

    store, proj, spec = project
    a, b = auto_settings(), dataclasses.replace(auto_settings(), max_masks=2)
    run_auto(store, None, spec, a)

    def stop_after_first(result, written) -> None:  # SIGTERM in the middle of a --redo
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_auto(store, None, spec, b, redo=True, on_result=stop_after_first)
    assert _hashes(store, proj["id"]) == {_ran(a).digest(), _ran(b).digest()}  # mixed for now
    with pytest.raises(SettingsMismatchError, match=r"interrupted .* other settings \(max_masks 2 -> 8\) is "
                                                   r"unfinished; rerun with redo=True") as refused:
        run_auto(store, None, spec, a)  # the old settings must not silently skip or mix
    assert "rerun with --redo" in refused.value.cli_message()
    finish = run_auto(store, None, spec, b)  # a plain rerun with the redo's settings finishes it
    assert (finish.images_written, finish.images_skipped, finish.resumed_redo) == (1, 1, True)
    assert _hashes(store, proj["id"]) == {_ran(b).digest()}
    assert all(n == m for n, m in count_sets(store, proj["id"]).values())
    assert run_auto(store, None, spec, b).images_skipped == 2  # and it is closed: nothing left to do


def test_unreadable_images_are_skipped_and_listed(base: dict, tmp_path: Path) -> None:
    from PIL import Image, ImageOps

    from segany.engine.auto import pending_tasks

    images = make_images(tmp_path / "images", 4)
    store, proj = make_project(tmp_path / "proj", images)
    spec = ModelSpec("vit_b", str(base["ckpt"]), "cpu", precision="fp32")
    try:
        images[0].unlink()  # missing
        images[1].write_bytes(b"not an image any more")  # changed since it was registered
        with Image.open(images[3]) as im:  # another picture of the same size: its masks would fit, and be wrong
            ImageOps.mirror(im.convert("RGB")).save(images[3], format="PNG" if images[3].suffix == ".png" else "JPEG")
        summary = run_auto(store, None, spec, auto_settings())
        assert (summary.images_written, summary.images_failed) == (1, 3)
        reasons = sorted(f["reason"] for f in summary.failures)
        assert all(r.startswith("changed:") and "sha256 differs" in r for r in reasons[:2]), reasons
        assert reasons[2].startswith("missing:") and "no longer exists" in reasons[2]
        assert not any("JPEG" in r for r in reasons)
        # Ray's path: the driver ships bytes; a file it cannot read reaches the worker without them.
        tasks, _ = pending_tasks(store, proj["id"], ship_bytes=True)
        assert {t.data is None for t in tasks if t.path == str(images[0])} == {True}
    finally:
        store.close()


def test_cli_auto_exit_status_and_wording(base: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`engine auto` exits 1 listing the bad image; --workers 0 is refused before the banner."""
    from segany.cli.main import main

    images = make_images(tmp_path / "images", 2)
    store, _ = make_project(tmp_path / "proj", images)
    store.close()
    images[0].unlink()
    s = auto_settings()
    cmd = ["engine", "auto", str(tmp_path / "proj"), "--model", "vit_b", "--checkpoint", str(base["ckpt"]),
           "--device", "cpu", "--precision", "fp32", "--quiet", "--points-per-side", str(s.points_per_side),
           "--pred-iou-thresh", "0", "--stability-thresh", "0", "--max-masks", "8", "--generator", s.generator]
    assert main([*cmd, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "--workers must be >= 1" in err and "stage 3 with" not in err
    ray_cmd = [a if a != "cpu" else "cuda:1" for a in cmd]  # --device cuda:1
    assert main([*ray_cmd, "--ray", "local"]) == 1  # refused before Ray starts or the model loads
    err = capsys.readouterr().err
    assert "--device cuda:1 with --ray: Ray gives each actor a whole GPU" in err and "stage 3 with" not in err
    assert main(cmd) == 1
    out, err = capsys.readouterr()
    assert "1 image written" in out and "1 could not be read" in out and "1 worker)" in out
    assert f"skipped: missing: {images[0]}" in err


@pytest.mark.timeout(120)
def test_weights_that_do_not_fit_fail_before_worker_processes_start(project: tuple, tmp_path: Path) -> None:
    """A worker process that fails to build its model is restarted by its pool, forever: a wrong file made
    `engine auto --workers 2` hang. The driver checks the weights first and fails with the reason."""
    import torch
    from conftest import tiny_config

    from segany.errors import CheckpointError
    from segany.modeling.sam import Sam

    store, proj, spec = project
    bare = tmp_path / "tiny_official_layout.pth"  # no embedded config: it needs the matching model name
    torch.save(Sam(tiny_config()).state_dict(), bare)
    with pytest.raises(CheckpointError, match="does not fit model 'vit_b'"):
        run_auto(store, None, dataclasses.replace(spec, checkpoint=str(bare)), auto_settings(), workers=2,
                 redo=True)
    assert all(m is None for _, m in count_sets(store, proj["id"]).values())
    assert store.list_model_versions() == [] and not (store.get_project(None)["settings"] or {}).get("auto_redo")


def test_second_run_on_a_busy_project_refuses(project: tuple) -> None:
    from segany.engine.db import JobLock, utcnow
    from segany.engine.locks import ProjectBusyError, claim_project, release_project

    store, proj, spec = project
    with store.transaction() as s:  # a live run elsewhere on this host (our parent process) holds it
        s.add(JobLock(project_id=proj["id"], kind="auto", owner=f"{socket.gethostname()}:{os.getppid()}",
                      heartbeat_at=utcnow()))
    with pytest.raises(ProjectBusyError, match="being processed by another `engine auto` run"):
        run_auto(store, None, spec, auto_settings())
    assert all(m is None for _, m in count_sets(store, proj["id"]).values())
    with store.transaction() as s:  # its process died: the claim is stale and taken over
        s.query(JobLock).update({"owner": f"{socket.gethostname()}:{_dead_pid()}"})
    assert run_auto(store, None, spec, auto_settings()).images_written == 2
    owner = claim_project(store, proj, "auto")  # and the finished run released it
    release_project(store, proj["id"], "auto", owner)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_heartbeat_runs_while_an_image_is_slow(project: tuple) -> None:
    """The claim is refreshed by a heartbeat, not only when a result arrives: an image taking longer than the
    stale limit must not let a driver on another host take over a live run. Released at the end."""
    import time

    from segany.engine.db import JobLock
    from segany.engine.locks import held_claim

    store, proj, _ = project

    def beat_at() -> object:
        with store.transaction() as s:
            lock = s.query(JobLock).filter_by(project_id=proj["id"], kind="auto").one_or_none()
            return None if lock is None else lock.heartbeat_at

    with held_claim(store, proj, "auto", every=0.05):
        first = beat_at()
        time.sleep(0.4)  # one slow image, no results
        assert beat_at() > first
    assert beat_at() is None


def test_ray_actors_take_the_clusters_gpus_whatever_the_driver_has() -> None:
    """`--device auto` is decided by the cluster's resources, not by the machine that starts the run: a driver
    without CUDA used to send CPU actors to a cluster full of GPUs, and refuse --device cuda outright."""
    from segany.engine.jobs import ray_device
    from segany.errors import InputError

    assert ray_device("auto", cluster_gpus=4) == "cuda" and ray_device("cuda", cluster_gpus=4) == "cuda"
    assert ray_device("auto", cluster_gpus=0) == "cpu" and ray_device("cpu", cluster_gpus=4) == "cpu"
    with pytest.raises(InputError, match="the Ray cluster has no GPU; pass device='cpu' or 'auto'") as refused:
        ray_device("cuda", cluster_gpus=0)
    assert refused.value.cli_message().endswith("the Ray cluster has no GPU; pass --device cpu or auto")
    with pytest.raises(InputError, match="device='mps' with backend='ray'") as refused:
        ray_device("mps", cluster_gpus=2)
    assert refused.value.cli_message().startswith("--device mps with --ray")
