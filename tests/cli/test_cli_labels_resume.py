"""`segany auto --labels` records the class names it labels with, and shipped weights that are missing get
advice that works (the text audit's findings 3 and 6). In-process, on a tiny image."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_cli_auto_outputs import SAMPLES

from segany.cli.main import main
from segany.errors import CheckpointError

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--device", "cpu",
        "--quiet"]


def test_resume_with_labels_spelled_another_way_is_the_same_run(tmp_path: Path) -> None:
    """`--labels Persons,person` labels with the one class `person`, as `--labels person` does: the record kept
    the raw spelling, so the resume was refused as "other settings"."""
    src = tmp_path / "in"
    src.mkdir()
    Image.open(SAMPLES[0]).convert("RGB").resize((48, 32)).save(src / "a.jpg")
    out = tmp_path / "out"
    assert main(["auto", str(src), "--model", "segany_tiny_labels", "--labels", "Persons,person", *FAST,
                 "--out", str(out)]) == 0
    assert main(["auto", str(src), "--model", "segany_tiny_labels", "--labels", "person", *FAST, "--out", str(out),
                 "--resume"]) == 0


def test_missing_shipped_weights_say_reinstall_not_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """The label head has no download URL: the advice `segany download segany_tiny_labels` failed in turn."""
    import segany.cli._util as util

    monkeypatch.setattr("segany.checkpoints.find_weights", lambda name: None)
    with pytest.raises(CheckpointError) as info:
        util.resolve_checkpoint("segany_tiny_labels", None)
    text = str(info.value)
    assert "segany download" not in text and "reinstall segany" in text
    assert "retrain with `bash scripts/train_label_head.sh`" in text
