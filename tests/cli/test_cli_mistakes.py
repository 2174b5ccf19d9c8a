"""Command-line mistakes found by a new-user audit: each is one clear line, a non-zero exit, and nothing written.

In-process (``main(argv)``) where the check fails before a model loads, which is the point of most of them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_IMAGE
from PIL import Image

from segany.cli.main import main


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--point", "100,100", "--box", "10,10,50,50", "--box", "60,60,90,90"], "--box was given 2 times"),
    (["--box", "0,0,99999,99999"], "reaches outside the 640x425 (width x height) image"),
    (["--box=-10,-10,50,50"], "reaches outside"),
    (["--point", "100,100", "--device", "foo"], "--device 'foo' is not a device name"),
])
def test_predict_refuses_before_loading_a_model(args: list[str], fragment: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["predict", str(SAMPLE_IMAGE), *args, "--out", str(out)]) == 1
    assert fragment in _err(capsys)
    assert not out.exists()


def test_out_inside_a_file_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for command in (["predict", str(SAMPLE_IMAGE), "--point", "100,100"], ["auto", str(SAMPLE_IMAGE)]):
        assert main([*command, "--out", str(afile / "sub")]) == 1
        assert "cannot be created" in _err(capsys) and afile.read_text() == "x"


def test_a_negative_value_gets_the_equals_form_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(SAMPLE_IMAGE), "--point", "-5,3", "--out", "o"])
    assert exc.value.code == 2
    assert "needs '=': --point=-5,3" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a missing value is not that mistake: no hint
        main(["predict", str(SAMPLE_IMAGE), "--checkpoint", "--out", "o"])
    assert "needs '='" not in capsys.readouterr().err


def test_segany_home_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("SEGANY_HOME", str(home))
    assert main(["models"]) == 1
    assert "SEGANY_HOME" in _err(capsys)


def test_checkpoint_messages_never_suggest_unpickling(tmp_path: Path) -> None:
    import argparse

    from segany.checkpoints import build_sam
    from segany.errors import CheckpointError

    garbage, objects = tmp_path / "garbage.pt", tmp_path / "objects.pt"
    garbage.write_text("garbage\n")
    torch.save({"args": argparse.Namespace(lr=1.0)}, objects)
    with pytest.raises(CheckpointError, match="not a torch.save file") as e1:
        build_sam("segany_tiny", checkpoint=garbage)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors") as e2:
        build_sam("segany_tiny", checkpoint=objects)
    for e in (e1, e2):
        assert "weights_only" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # as the reference package raises there
        build_sam("segany_tiny", checkpoint=tmp_path / "nope.pt")


def test_file_system_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """A safety net for paths no check foresaw: the OS's reason and the path, not 'unexpected error'."""
    import segany.cli.main as cli
    import segany.cli.models as models

    def boom(_args: object) -> int:
        raise FileExistsError(17, "File exists", "/tmp/somewhere")

    monkeypatch.setattr(models, "run", boom)  # the parser is built per call and binds this
    assert cli.main(["models"]) == 1
    err = _err(capsys)
    assert "File exists: '/tmp/somewhere'" in err and "unexpected" not in err


def test_image_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segany.data.images import load_image
    from segany.errors import ImageLoadError, InputError

    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20)).save(path)
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "500")
    with pytest.raises(ImageLoadError, match="more pixels than the 500 segany opens"):
        load_image(path)
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "800")
    assert load_image(path).shape == (20, 40, 3)
    monkeypatch.setenv("SEGANY_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="not a positive whole number"):
        load_image(path)
    monkeypatch.delenv("SEGANY_MAX_IMAGE_PIXELS")
    assert np.asarray(load_image(path)).dtype == np.uint8


def test_python_dash_m_segany() -> None:
    r = subprocess.run([sys.executable, "-m", "segany", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0 and "usage: segany" in r.stdout


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`segany ... | head` closes the pipe early: exit 141 with nothing on stderr (it printed "error: Broken pipe;
    check the path and its permissions")."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "segany", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize(("argv", "compile_option"), [([], False), (["--compile"], True),
                                                      (["--compile-mode", "reduce-overhead"], "reduce-overhead"),
                                                      (["--compile", "--compile-mode", "max-autotune"], "max-autotune")])
def test_compile_mode_reaches_the_predictor(argv: list[str], compile_option: object) -> None:
    import argparse

    from segany.cli._util import add_speed_arguments, predictor_options

    p = argparse.ArgumentParser()
    add_speed_arguments(p)
    assert predictor_options(p.parse_args(argv), "cpu")["compile"] == compile_option


def test_an_unknown_compile_mode_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--compile-mode", "fast", "x.jpg"])
    assert exc.value.code == 2 and "reduce-overhead" in capsys.readouterr().err
