"""`segany export onnx` subcommand: arguments, files written, clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="pip install 'segany[onnx]'")

from segany.cli import export as export_cli  # noqa: E402
from segany.errors import InputError, UnknownModelError  # noqa: E402


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segany")
    export_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_sam) -> Path:
    from segany.checkpoints import save_checkpoint

    return save_checkpoint(tiny_sam, tmp_path / "tiny.pt")


def test_export_writes_both_graphs(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "onnx"
    args = _parse(["export", "onnx", "--model", "vit_b", "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    assert args.func(args) == 0
    assert (out / "encoder.onnx").exists() and (out / "decoder.onnx").exists()
    assert "decoder:" in capsys.readouterr().out
    import json

    from segany.hashing import file_digest

    meta = json.loads((out / "segany_onnx.json").read_text())  # where the weights came from, by content
    assert meta["weights"] == {"checkpoint": str(tiny_checkpoint.resolve()),
                               "sha256": file_digest(tiny_checkpoint, "sha256")}


@pytest.mark.parametrize("argv, exc, fragment", [
    (["--model", "vit_bb", "--random-weights"], UnknownModelError, "did you mean"),
    (["--model", "vit_b", "--checkpoint", "/nonexistent.pt"], InputError, "does not exist"),
    (["--model", "vit_b", "--checkpoint", "X", "--random-weights"], InputError, "exclude each other"),
])
def test_bad_arguments(tmp_path, argv, exc, fragment):
    args = _parse(["export", "onnx", *argv, "--out", str(tmp_path / "o")])
    with pytest.raises(exc, match=fragment):
        export_cli.run(args)


def test_out_is_a_file(tmp_path, tiny_checkpoint):
    f = tmp_path / "f"
    f.write_text("")
    args = _parse(["export", "onnx", "--model", "vit_b", "--checkpoint", str(tiny_checkpoint), "--out", str(f)])
    with pytest.raises(InputError, match="is a file"):
        export_cli.run(args)


def test_missing_required_options(capsys):
    with pytest.raises(SystemExit):
        _parse(["export", "onnx", "--out", "x"])
    assert "--model" in capsys.readouterr().err


def test_no_cached_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))
    args = _parse(["export", "onnx", "--model", "vit_t", "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match="segany download"):
        export_cli.run(args)
