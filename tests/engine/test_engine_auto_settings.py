"""Stage 3's run settings: --threads reaches every worker, --precision auto is decided once on the driver and
recorded as a setting, the driver checks weights without reading them, and refusals word the fix for their
caller (redo=True in Python, --redo on the command line).

Worker pools run in this process (a thread pool stands in for the process pool, with the same initializer) and
the generator runs no model: these tests are about what reaches the workers, not about masks."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_fails
from engine_fixtures import auto_settings, make_images, make_project, save_tiny_checkpoint

from segany.engine.auto import ModelSpec, SettingsMismatchError, check_weights, run_auto
from segany.errors import InputError

SEEN: list[dict[str, Any]] = []  # what each Probe.generate call saw, in this process


class Probe:
    """A stage-3 generator that runs no model: it notes the torch threads and the precision its worker gave it
    (AutoWorker puts a SamPredictor of that precision in ``predictor`` when it is not the default) and finds
    no masks."""

    def __init__(self, sam: Any, **_: Any) -> None:
        self.predictor: Any = None

    def generate(self, image: Any) -> list[dict[str, Any]]:
        fast = getattr(self.predictor, "fast", None)
        SEEN.append({"threads": torch.get_num_threads(),
                     "dtype": "exact fp32" if fast is None else str(fast.dtype).removeprefix("torch.")})
        return []


PROBE = f"{__name__}:Probe"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("auto_settings")
    return {"ckpt": save_tiny_checkpoint(root / "tiny.pt"), "images": make_images(root / "images", 2)}


@pytest.fixture
def project(base: dict, tmp_path: Path) -> Any:
    SEEN.clear()
    store, proj = make_project(tmp_path / "proj", base["images"])
    yield store, proj, tmp_path / "proj"
    store.close()


@pytest.fixture
def keep_threads() -> Any:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pool_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """PoolRunner's process pool as one thread of this process, built with the same initializer and arguments
    (spawning real processes costs seconds; what is checked here is what each worker is given)."""
    from segany.engine import jobs

    def pool(max_workers: int, mp_context: Any = None, initializer: Any = None, initargs: tuple = ()) -> Any:
        return concurrent.futures.ThreadPoolExecutor(1, initializer=initializer, initargs=initargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(jobs, "_POOL_WORKER", None)  # restored after: the stand-in sets this module's global
    monkeypatch.setattr(jobs, "_POOL_INIT_ERROR", None)


def _spec(base: dict, precision: str = "fp32") -> ModelSpec:
    return ModelSpec("vit_b", str(base["ckpt"]), "cpu", precision=precision)


def _probe_settings() -> Any:
    return dataclasses.replace(auto_settings(), generator=PROBE)


def _hashes(store: Any, project_id: int) -> set[str | None]:
    from sqlalchemy import select

    from segany.engine.db import Image, ImageRun

    with store.transaction(write=False) as s:
        return set(s.scalars(select(ImageRun.settings_hash).join(Image, Image.id == ImageRun.image_id)
                             .where(Image.project_id == project_id)))


# ------------------------------------------------------------------------------------------------ threads
def test_threads_reach_every_pool_worker(base: dict, project: Any, pool_in_process: None, keep_threads: None) -> None:
    """`--threads N` (run_auto(threads=N)) is each local worker's torch threads, not the cores shared out
    (2 cores / 2 workers = 1 here), and is no setting: a rerun with other threads resumes."""
    store, proj, _ = project
    summary = run_auto(store, None, _spec(base), _probe_settings(), workers=2, threads=3)
    assert summary.images_written == 2 and [s["threads"] for s in SEEN] == [3, 3]
    assert run_auto(store, None, _spec(base), _probe_settings(), threads=1).images_skipped == 2
    with pytest.raises(InputError, match="threads must be a whole number of at least 1, got 0") as refused:
        run_auto(store, None, _spec(base), _probe_settings(), workers=2, threads=0)
    assert refused.value.cli_message().startswith("--threads must be at least 1, got 0")


def test_cli_threads(base: dict, project: Any, capsys: pytest.CaptureFixture[str], keep_threads: None) -> None:
    """`segany engine auto --threads N` as `segany auto --threads N`: the worker runs on N threads; 0 is refused
    in one line before the run starts."""
    from segany.cli.main import main

    _, _, folder = project
    cmd = ["engine", "auto", str(folder), "--model", "vit_b", "--checkpoint", str(base["ckpt"]), "--device", "cpu",
           "--precision", "fp32", "--quiet", "--generator", PROBE]
    cli_fails([*cmd, "--threads", "0"], capsys, "--threads must be at least 1, got 0")
    assert main([*cmd, "--threads", "2"]) == 0
    assert [s["threads"] for s in SEEN] == [2, 2]


# ------------------------------------------------------------------------------------------------ precision
def test_auto_precision_is_decided_on_the_driver(base: dict, project: Any, pool_in_process: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`--precision auto` is decided once, where the run starts, and every worker runs that: here the driver's
    CPU has bf16 and the workers' CPUs do not (decided on each worker, they ran fp32 unrecorded)."""
    store, proj, _ = project
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")

    def workers_lack_bf16(runner: Any) -> None:  # before any worker process starts
        monkeypatch.setenv("SEGANY_CPU_BF16", "0")

    summary = run_auto(store, None, _spec(base, "auto"), _probe_settings(), workers=2, runner_hook=workers_lack_bf16)
    assert [s["dtype"] for s in SEEN] == ["bfloat16", "bfloat16"]
    assert summary.images_written == 2 and summary.precision == "bf16"
    assert _hashes(store, proj["id"]) == {dataclasses.replace(_probe_settings(), precision="bf16").digest()}


def test_rerun_where_auto_decides_otherwise_is_refused(base: dict, project: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The precision that ran is a setting: a plain rerun where `auto` decides another one is refused like any
    other change of settings, naming it and both fixes, worded for the caller. The folded fp32 decoder is no
    setting (equal to the exact one to rounding). Markers of an older segany, whose hash has no precision,
    count as made with this run's precision."""
    from sqlalchemy import update

    from segany.engine.auto import SETTINGS_KEY
    from segany.engine.db import ImageRun

    store, proj, _ = project
    settings = _probe_settings()
    monkeypatch.setenv("SEGANY_CPU_BF16", "0")
    first = run_auto(store, None, _spec(base, "auto"), settings)
    assert [s["dtype"] for s in SEEN] == ["float32", "float32"]  # fp32 with the folded decoder
    monkeypatch.setenv("SEGANY_CPU_BF16", "1")
    with pytest.raises(SettingsMismatchError) as refused:
        run_auto(store, None, _spec(base, "auto"), settings)  # was: "2 already done", bf16 recorded nowhere
    assert first.precision == "fp32"
    change = "2 images were done with other settings (precision 'fp32' -> 'bf16'; "
    assert str(refused.value) == (
        f"{change}precision='auto' runs bf16 on this machine); pass redo=True to redo them with these settings, "
        "or rerun with the settings used before (ModelSpec(precision='fp32'))")
    assert refused.value.cli_message() == (
        f"{change}--precision auto runs bf16 on this machine); pass --redo to redo them with these settings, "
        "or rerun with the settings used before (--precision fp32)")
    fp32 = dataclasses.replace(settings, precision="fp32").digest()
    assert _hashes(store, proj["id"]) == {fp32}
    assert run_auto(store, None, _spec(base, "fp32"), settings).images_skipped == 2  # exact decoder: same setting

    # Markers an older segany wrote (no precision in their hash, none remembered) are not refused...
    with store.transaction() as s:
        s.execute(update(ImageRun).values(settings_hash=settings.digest()))
    store.update_project(proj["id"], settings={SETTINGS_KEY: {settings.digest(): {
        k: v for k, v in dataclasses.asdict(settings).items() if k != "precision"}}})
    assert run_auto(store, None, _spec(base, "auto"), settings).images_skipped == 2
    # ...and a change of other settings over them names that change alone.
    with pytest.raises(SettingsMismatchError, match=r"other settings \(max_masks 8 -> 2\); pass redo=True"):
        run_auto(store, None, _spec(base, "auto"), dataclasses.replace(settings, max_masks=2))
    redone = run_auto(store, None, _spec(base, "auto"), settings, redo=True)
    assert redone.images_written == 2
    assert _hashes(store, proj["id"]) == {dataclasses.replace(settings, precision="bf16").digest()}


def test_an_interrupted_redo_of_another_precision_names_it() -> None:
    """An unfinished --redo that ran bf16, rerun plainly where `auto` decides fp32: the refusal names the precision
    and the --precision to finish it with (it said only "other settings or another model")."""
    from segany.engine.auto import REDO_KEY, SETTINGS_KEY, plan_run

    bf16 = dataclasses.replace(auto_settings(), precision="bf16")
    fp32 = dataclasses.replace(bf16, precision="fp32")
    project = {"id": 1, "settings": {REDO_KEY: {"settings_hash": bf16.digest(), "model_version_id": 7, "started": 1.0},
                                     SETTINGS_KEY: {bf16.digest(): dataclasses.asdict(bf16)}}}
    with pytest.raises(SettingsMismatchError) as refused:
        plan_run(None, project, fp32, 7, redo=False, requested_precision="auto")
    assert str(refused.value) == (
        "an interrupted run_auto(..., redo=True) with other settings (precision 'bf16' -> 'fp32'; precision='auto' "
        "runs fp32 on this machine) is unfinished; rerun with redo=True to redo every image with these settings and "
        "this model, or with the settings and model it used (ModelSpec(precision='bf16'))")
    assert refused.value.cli_message().endswith("or with the settings and model it used (--precision bf16)")
    assert "--precision auto runs fp32 on this machine" in refused.value.cli_message()


# ------------------------------------------------------------------------------------- fixes worded per caller
def test_refusals_word_the_fix_for_python_and_the_cli(project: Any) -> None:
    """Python callers are told the keyword (workers=, AutoSettings(generator=)), the command line the flag."""
    from segany.engine.auto import make_generator

    store, _, _ = project
    with pytest.raises(InputError, match="^workers must be >= 1 on one machine, got 0$") as refused:
        run_auto(store, None, ModelSpec(), auto_settings(), workers=0)
    assert refused.value.cli_message() == "--workers must be >= 1 on one machine, got 0"
    with pytest.raises(InputError, match=r"pass another AutoSettings\(generator='module:Class'\)$") as refused:
        make_generator(None, dataclasses.replace(auto_settings(), generator="no_such_module_here:Gen"))
    assert refused.value.cli_message().endswith("pass another --generator module:Class")


# ----------------------------------------------------------------------------------------- driver's weights check
def _file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory that map ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == os.path.realpath(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def test_driver_checks_weights_without_reading_them(base: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """check_weights (before worker processes start) reads names and shapes: the tensors stay in the file, mapped,
    instead of a 2.5 GB ViT-H being read whole on the driver before every worker reads it again. Its refusals
    are those of the full read the workers do."""
    from conftest import tiny_config

    from segany.checkpoints import read_checked
    from segany.modeling.sam import Sam

    loaded: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(torch, "load", spy)
    check_weights(_spec(base))
    tensors = [t for t in _tensors(loaded[-1]) if t.numel()]
    ranges = _file_ranges(base["ckpt"])
    assert tensors and all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in tensors), \
        "the driver copied the weights into memory"

    legacy = tmp_path / "legacy.pt"  # a pre-zip torch.save file cannot be mapped: read whole, not refused
    torch.save(real_load(base["ckpt"], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    check_weights(ModelSpec("vit_b", str(legacy), "cpu"))

    garbage, wrapped = tmp_path / "garbage.pt", tmp_path / "wrapped.pth"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({f"ema.{k}": v for k, v in Sam(tiny_config()).state_dict().items()}, wrapped)  # does not fit
    for path in (garbage, wrapped, tmp_path / "missing.pt"):
        with pytest.raises(Exception) as full:
            read_checked("segany_tiny", path)
        with pytest.raises(type(full.value)) as driver:
            check_weights(ModelSpec("segany_tiny", str(path), "cpu"))
        assert str(driver.value) == str(full.value)
        assert driver.value.cli_message() == full.value.cli_message()
