# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""`segany serve` refuses bad input before serving: one line, exit 1 (2 for usage errors), nothing created."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from annotation_fixtures import project, tiny_checkpoint  # noqa: F401  (fixtures)
from conftest import cli_fails

from segany.cli import serve
from segany.engine.store import Store, open_store


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], fragment: str, code: int = 1) -> str:
    line = cli_fails(argv, capsys, fragment, code)
    assert "serving" not in line
    return line


@pytest.fixture
def proj_dir(project: tuple[Store, dict[str, Any]]) -> str:
    assert project[0].project_dir is not None
    return str(project[0].project_dir)


@pytest.mark.parametrize(("content", "fragment"), [
    (b"garbage", "not a readable PyTorch checkpoint"),
    (None, "does not exist"),
])
def test_bad_checkpoint_refused_before_serving(proj_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               content: bytes | None, fragment: str) -> None:
    ckpt = tmp_path / "weights.pt"
    if content is not None:
        ckpt.write_bytes(content)
    _fails(["serve", proj_dir, "--checkpoint", str(ckpt), "--device", "cpu"], capsys, fragment)


def test_checkpoint_of_another_model_refused(proj_dir: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(3)}, ckpt)
    _fails(["serve", proj_dir, "--checkpoint", str(ckpt), "--device", "cpu"], capsys, "does not fit model")


@pytest.mark.parametrize(("device", "fragment"), [("nonsense", "not a device name")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_unusable_device_refused(proj_dir: str, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str],
                                 device: str, fragment: str) -> None:
    _fails(["serve", proj_dir, "--checkpoint", str(tiny_checkpoint), "--device", device], capsys, fragment)


@pytest.mark.parametrize(("option", "value"), [
    ("--port", "99999"), ("--port", "-1"), ("--port", "http"), ("--cache-size", "0"), ("--cache-size", "-3"),
    ("--max-upload-mb", "0"), ("--max-upload-mb", "-1"), ("--max-upload-mb", "nan"),
])
def test_out_of_range_options_are_usage_errors(proj_dir: str, capsys: pytest.CaptureFixture[str], option: str,
                                               value: str) -> None:
    _fails(["serve", proj_dir, "--no-model", f"{option}={value}"], capsys, option, code=2)


def test_taken_port_named_before_serving(proj_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _fails(["serve", proj_dir, "--no-model", "--port", str(port)], capsys, f"port {port}")
    assert "already in use" in line and "--port" in line


def test_existing_file_as_project_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("not a project")
    _fails(["serve", str(target), "--create", "--no-model"], capsys, "is a file, not a folder")
    assert target.read_text() == "not a project"


def test_create_makes_a_servable_project(tmp_path: Path) -> None:
    target = tmp_path / "fresh"
    p = argparse.ArgumentParser()
    serve._add_arguments(p)
    app = serve.build_app(p.parse_args([str(target), "--create", "--no-model", "--project", "cats"]))
    try:
        assert app.state.store.get_project()["name"] == "cats"
    finally:
        app.state.store.close()
    store = open_store(target)  # a second run needs no --create
    try:
        assert [x["name"] for x in store.list_projects()] == ["cats"]
    finally:
        store.close()


def test_create_leaves_nothing_when_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    target = tmp_path / "new" / "proj"
    _fails(["serve", str(target), "--create", "--checkpoint", str(bad), "--device", "cpu"], capsys,
           "not a readable PyTorch checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_model_names_what_is_served_over_the_projects_current_model(proj_dir: str, tiny_checkpoint: Path) -> None:
    """Without --model the project's promoted model is served; --model picks another, as in `segany engine`
    (it used to be ignored whenever the project had a current model)."""
    from segany.engine.retrain import set_current_model

    store = open_store(proj_dir)
    try:
        mv = store.register_model_version("promoted", "vit_b", str(tiny_checkpoint))
        set_current_model(store, None, mv)
    finally:
        store.close()
    p = argparse.ArgumentParser()
    serve._add_arguments(p)
    served = {}
    for extra in ([], ["--model", "segany_tiny"]):
        app = serve.build_app(p.parse_args([proj_dir, "--device", "cpu", *extra]))
        try:
            served[bool(extra)] = (app.state.model.model_type, app.state.model.checkpoint)
        finally:
            app.state.store.close()
    assert served[False] == ("vit_b", str(tiny_checkpoint))
    assert served[True][0] == "segany_tiny" and served[True][1] != str(tiny_checkpoint)


def test_startup_weights_check_maps_the_file_instead_of_reading_it(tiny_checkpoint: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`segany serve` checks the weights at startup and builds the model on first use: the check maps the file
    (a ViT-H's 2.5 GB were read whole, then read again to build the model)."""
    from segany.server.model_service import ModelService

    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ModelService("tiny", checkpoint=tiny_checkpoint, device="cpu").check_weights()
    assert calls and all(c.get("mmap") for c in calls), calls
