"""Stage 3: local and Ray runs agree, a killed Ray actor loses and duplicates nothing, kill -9 then resume."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import (
    auto_settings,
    make_images,
    make_project,
    save_tiny_checkpoint,
    use_test_generator_path,
)
from PIL import Image

from segany.engine.auto import ModelSpec, count_sets, run_auto
from segany.engine.masks import decode_rle

N_IMAGES = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    use_test_generator_path()
    root = tmp_path_factory.mktemp("auto")
    ckpt = save_tiny_checkpoint(root / "tiny.pt")
    images = make_images(root / "images", N_IMAGES)
    store, proj = make_project(root / "local", images)
    spec = ModelSpec("vit_b", str(ckpt), "cpu")
    summary = run_auto(store, None, spec, auto_settings())
    assert summary.images_written == N_IMAGES
    return {"root": root, "ckpt": ckpt, "images": images, "spec": spec, "local": masks_by_file(store, proj["id"])}


def masks_by_file(store, project_id: int) -> dict[str, list[np.ndarray]]:
    names = {im["id"]: im["file_name"] for im in store.list_images(project_id)}
    out: dict[str, list[np.ndarray]] = {n: [] for n in names.values()}
    for a in store.list_annotations(project_id=project_id, sources=["auto"]):
        out[names[a["image_id"]]].append(decode_rle(a["segmentation"]))
    return out


def assert_one_set_each(store, project_id: int, n_images: int) -> None:
    sets = count_sets(store, project_id)
    assert len(sets) == n_images
    for image_id, (stored, marker) in sets.items():
        assert marker is not None, f"image {image_id} has no done marker"
        assert stored == marker, f"image {image_id}: {stored} masks stored, marker says {marker}"


def assert_same_masks(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> None:
    """Same masks per image; float sums may differ in the last bit across thread counts, so match by IoU."""
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for m in a[name]:
            best = max(((m & o).sum() / (m | o).sum() if (m | o).any() else 1.0 for o in b[name]), default=0.0)
            assert best > 0.98, f"{name}: a mask of one run has no match in the other (best IoU {best:.3f})"


@pytest.fixture(scope="module")
def ray_cluster(setup: dict):
    import ray  # a dev dependency: a missing Ray fails here with the import error, it is not skipped

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_matches_local_and_survives_actor_kill(setup: dict, ray_cluster, tmp_path: Path) -> None:
    # Plain Ray run: the same masks as the single-machine run. Its device is left to the cluster (CPUs here).
    store, proj = make_project(tmp_path / "ray", setup["images"])
    s = run_auto(store, None, dataclasses.replace(setup["spec"], device="auto"), auto_settings(), backend="ray",
                 workers=2)
    assert (s.images_written, s.duplicates_dropped) == (N_IMAGES, 0)
    assert_one_set_each(store, proj["id"], N_IMAGES)
    assert_same_masks(setup["local"], masks_by_file(store, proj["id"]))

    # Kill one actor's process (SIGKILL) once results flow: its tasks are retried on a fresh actor.
    # The victim is the actor that sent the first result. With 6 images, 2 actors and 2 tasks in flight each,
    # 2 images are still queued then, and the next one goes to that actor's free slot: the kill cannot go
    # unnoticed. (Killing a fixed actor could not promise this: it may already have finished all its work.)
    store2, proj2 = make_project(tmp_path / "ray_kill", setup["images"])
    runners = []
    pids: list[int] = []
    killed = []

    def hook(runner) -> None:  # before any task is sent, so the pid calls do not queue behind images
        runners.append(runner)
        pids.extend(runner.actor_pids())

    def on_result(result, written) -> None:
        if not killed:
            pid = int(result.worker.removeprefix("pid"))
            assert pid in pids, f"result from {result.worker}, actors are {pids}"
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    s2 = run_auto(store2, None, setup["spec"], auto_settings(), backend="ray", workers=2,
                  runner_hook=hook, on_result=on_result)
    assert killed and runners[0].restarts >= 1, "the actor kill was not noticed"
    assert s2.images_written + s2.duplicates_dropped >= N_IMAGES
    assert_one_set_each(store2, proj2["id"], N_IMAGES)
    assert_same_masks(setup["local"], masks_by_file(store2, proj2["id"]))
    # A result delivered twice (a retried task) is dropped, not written again.
    again = run_auto(store2, None, setup["spec"], auto_settings(), backend="ray", workers=1, redo=False)
    assert again.images_written == 0 and again.images_skipped == N_IMAGES


@pytest.mark.timeout(180)
def test_pool_survives_a_dead_worker_and_blames_only_its_image(setup: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers 2` on a process pool, with one image that kills its worker (out of memory). A dead worker
    lost its task and multiprocessing.Pool waited forever; then every image in flight with it was charged the
    death, and the run ended blaming whichever came first. Now the images in flight run again one at a time:
    the culprit is the one left to do, with the reason, and every other image is written once, as in the
    single-process run."""
    from grid_generator import POISON_HEIGHT

    from segany.engine import jobs

    monkeypatch.setattr(jobs, "POOL_MAX_ATTEMPTS", 1)  # one death alone is enough to blame (3 by default)
    poison = tmp_path / "poison.jpg"
    Image.open(setup["images"][0]).convert("RGB").resize((90, POISON_HEIGHT)).save(poison)
    good = setup["images"][:4]
    store, proj = make_project(tmp_path / "pool_kill", [poison, *good])
    runners: list = []
    settings = dataclasses.replace(auto_settings(), generator="grid_generator:PoisonGenerator")
    s = run_auto(store, None, setup["spec"], settings, workers=2, runner_hook=runners.append)
    assert runners[0].restarts >= 2, "a death in company, then the culprit's death alone"
    assert (s.images_written, s.images_failed) == (4, 1)
    (failure,) = s.failures
    assert failure["path"].endswith("poison.jpg") and "worker process died" in failure["reason"]
    sets = count_sets(store, proj["id"])
    assert sorted(m is not None for _, m in sets.values()) == [False, True, True, True, True]
    written = masks_by_file(store, proj["id"])
    assert_same_masks({k: v for k, v in setup["local"].items() if k in written and k != "poison.jpg"},
                      {k: v for k, v in written.items() if k != "poison.jpg"})


@pytest.mark.timeout(120)
def test_pool_worker_that_cannot_start_reports_why(setup: dict, tmp_path: Path) -> None:
    """A worker whose model or generator fails to build was restarted by multiprocessing.Pool forever (the
    run hung); the reason now reaches the driver."""
    from segany.engine.jobs import JobError

    store, proj = make_project(tmp_path / "pool_init", setup["images"][:2])
    bad = dataclasses.replace(auto_settings(), generator="no_such_generator_module:Gen")
    with pytest.raises(JobError, match="could not load the model .*no_such_generator_module.* cannot be imported"):
        run_auto(store, None, setup["spec"], bad, workers=2)


def test_write_result_is_idempotent(setup: dict, tmp_path: Path) -> None:
    from segany.engine.auto import AutoWorker, ImageTask, pending_tasks, write_result

    store, proj = make_project(tmp_path / "idem", setup["images"][:1])
    tasks, done = pending_tasks(store, proj["id"])
    assert (len(tasks), done) == (1, 0)
    result = AutoWorker(setup["spec"], auto_settings()).process(tasks[0])
    assert write_result(store, result, model_version_id=None, settings=auto_settings())
    assert not write_result(store, result, model_version_id=None, settings=auto_settings())
    assert_one_set_each(store, proj["id"], 1)
    assert pending_tasks(store, proj["id"])[0] == []
    assert isinstance(tasks[0], ImageTask)


@pytest.mark.slow
def test_kill9_then_resume_leaves_one_set_per_image(setup: dict, tmp_path: Path) -> None:
    from segany.engine.store import open_store

    n = 6
    images = make_images(tmp_path / "images", n)
    store, proj = make_project(tmp_path / "proj", images)
    s = auto_settings()
    cmd = [sys.executable, "-m", "segany.cli.main", "engine", "auto", str(tmp_path / "proj"), "--model", "vit_b",
           "--checkpoint", str(setup["ckpt"]), "--device", "cpu", "--points-per-side", str(s.points_per_side),
           "--pred-iou-thresh", "0", "--stability-thresh", "0", "--max-masks", "8", "--generator", s.generator,
           "--quiet", "--workers", "2"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        done = sum(1 for _, m in count_sets(store, proj["id"]).values() if m is not None)
        if done >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1].decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sets = count_sets(store, proj["id"])
    finished = [i for i, (_, m) in sets.items() if m is not None]
    assert 0 < len(finished) < n, "kill should land mid-run"
    for image_id, (stored, marker) in sets.items():  # half-written images are impossible
        assert stored == (marker or 0), f"image {image_id}: {stored} masks but marker {marker}"
    store.close()
    # Resume: only the unfinished images run; afterwards exactly one set per image.
    out = subprocess.run(cmd[:-2] + ["--workers", "1", "--json"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'"images_skipped": {len(finished)}' in out.stdout
    store = open_store(tmp_path / "proj")
    assert_one_set_each(store, proj["id"], n)
    store.close()


def test_workers_run_bf16_on_cpus_that_have_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An AutoWorker given ``precision="auto"`` decides it on its machine: bf16 where the CPU multiplies bf16 in
    hardware, fp32 with the folded decoder elsewhere; ``fp32`` keeps a run exact everywhere. (run_auto decides
    it once, on the driver, and gives every worker the result: test_engine_auto_settings.py.)"""
    import torch

    from segany.amg.generator import SamAutomaticMaskGenerator
    from segany.engine.auto import AutoSettings, AutoWorker

    ckpt = str(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    settings = AutoSettings(points_per_side=4, generator="segany.amg:SamAutomaticMaskGenerator")
    seen = {}
    for flag, precision in (("1", "auto"), ("0", "auto"), ("1", "fp32")):
        monkeypatch.setenv("SEGANY_CPU_BF16", flag)
        worker = AutoWorker(ModelSpec(checkpoint=ckpt, model="segany_tiny", precision=precision), settings)
        assert isinstance(worker.generator, SamAutomaticMaskGenerator)
        fast = worker.generator.predictor.fast
        seen[(flag, precision)] = (worker.precision, None if fast is None else fast.dtype,
                                   None if fast is None else type(fast.decoder).__name__)
    assert seen == {("1", "auto"): ("bf16", torch.bfloat16, "FastMaskDecoder"),
                    ("0", "auto"): ("fp32", torch.float32, "FastMaskDecoder"), ("1", "fp32"): ("fp32", None, None)}
    from segany.errors import InputError

    with pytest.raises(InputError, match="precision must be auto, fp32, bf16 or fp16"):
        ModelSpec(checkpoint=ckpt, precision=b"not a precision")  # type: ignore[arg-type]
