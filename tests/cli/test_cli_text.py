"""``segany predict --text`` and ``segany auto --labels`` with the shipped label model (issue 10), in a subprocess.

The real segany_tiny_labels (bundled segany_tiny + its shipped class head) runs on CPU in seconds, so these
use it rather than random weights: what a user types is what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A bundled COCO sample with a person (and an umbrella) in it.
PERSON_IMAGE = REPO / "src" / "segany" / "assets" / "samples" / "coco_000000000036.jpg"
# Loose automatic-mask thresholds for segany_tiny (the demo's until 2026-11-26); SAM's defaults keep none.
LOOSE = ("--pred-iou-thresh", "0.25", "--stability-score-thresh", "0.3", "--stability-score-offset", "0.1")


def segany(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SEGANY_HOME": str(home), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "segany.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def segany_here(*args: str, home: Path, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``segany ARGS`` in this process (the same ``main`` as the console script): the refusals below fail before
    any image work, so a subprocess would mostly time torch's import. Returns (exit code, stderr)."""
    from segany.cli.main import main

    monkeypatch.setenv("SEGANY_HOME", str(home))
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    return int(code or 0), capsys.readouterr().err


def test_predict_text_with_the_label_model_writes_every_person(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "out"
    # An 8×8 search grid keeps the test fast (the default 16×16 decodes 4× the prompts).
    r = segany("predict", str(PERSON_IMAGE), "--model", "segany_tiny_labels", "--text", "person",
               "--points-per-side", "8", "--min-score", "0.02", "--max-instances", "3", "--out", str(out), home=home)
    assert r.returncode == 0, r.stderr
    stem = PERSON_IMAGE.stem
    assert r.stdout.strip() == str(out / f"{stem}.json")
    result = json.loads((out / f"{stem}.json").read_text())
    assert result["model"] == "segany_tiny_labels"
    assert result["decoder"] == "exact"  # what ran: the text path reads mask tokens from the reference decoder
    assert result["prompts"]["text"] == "person" and result["prompts"]["min_score"] == 0.02
    assert all(m["score"] >= 0.02 for m in result["masks"])
    # The cap (50 by default) cut the list without a word; it is now an option, recorded, and said when reached.
    assert len(result["masks"]) == 3 and result["prompts"]["max_instances"] == 3
    assert result["multimask"] is False  # text alone: instances, not a click's candidates
    assert "kept the best 3 instances (--max-instances)" in r.stderr
    assert result["checkpoint"].endswith("segany_tiny_labels_head.pt")
    masks = result["masks"]
    assert len(masks) >= 1
    scores = [m["score"] for m in masks]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    files = {p.name for p in out.iterdir()}
    assert {f"{stem}.json", f"{stem}_overlay.png"} | {m["file"] for m in masks} == files
    h, w = result["size_hw"]
    assert all(m["area"] > 0 and m["rle"]["size"] == [h, w] for m in masks)


def test_auto_labels_records_carry_label_and_score(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "out"
    # Spelled as a user might: each label comes out as the class's own name, once (as predict and the server say it)
    r = segany("auto", str(PERSON_IMAGE), "--model", "segany_tiny_labels", "--labels", " Person ,umbrellas,CAR,person",
               "--points-per-side", "6", *LOOSE, "--device", "cpu", "--quiet", "--out", str(out), home=home)
    assert r.returncode == 0, r.stderr
    anns = json.loads((out / f"{PERSON_IMAGE.stem}.json").read_text())["annotations"]
    assert anns, "the loose thresholds keep some masks of segany_tiny"
    assert all(a["label"] in {"person", "umbrella", "car"} and 0.0 <= a["label_score"] <= 1.0 for a in anns)


@pytest.mark.parametrize("argv", [
    ("predict", str(PERSON_IMAGE), "--text", "person"),  # default model segany_tiny: no class head
    ("auto", str(PERSON_IMAGE), "--labels", "person", "--device", "cpu", "--quiet"),
])
def test_text_with_a_model_without_labels_names_the_label_model(argv: tuple[str, ...], tmp_path: Path,
                                                                home: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = segany_here(*argv, "--out", str(tmp_path / "out"), home=home, capsys=capsys,
                            monkeypatch=monkeypatch)
    assert code == 1, err
    assert "segany_tiny_labels" in err and "Traceback" not in err
    assert "embedding" not in err and not (tmp_path / "out").exists()


def test_nothing_above_min_score_says_how_to_see_weaker_matches(tmp_path: Path, home: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / f"{PERSON_IMAGE.stem}.json"  # an earlier prompt's result, which stays: said, not implied
    earlier.write_text(json.dumps({"image": str(PERSON_IMAGE), "masks": [], "prompts": {"text": "umbrella"}}))
    code, err = segany_here("predict", str(PERSON_IMAGE), "--model", "segany_tiny_labels", "--text", "person",
                            "--points-per-side", "2", "--min-score", "1", "--out", str(out), home=home,
                            capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1 and "nothing matched --text 'person'" in err and "--min-score 1" in err
    assert f"{earlier} is still an earlier run's result, not this prompt's" in err


@pytest.mark.parametrize("argv", [
    ("predict", str(PERSON_IMAGE), "--model", "segany_tiny_labels", "--text", "zebra crossing"),
    ("auto", str(PERSON_IMAGE), "--model", "segany_tiny_labels", "--labels", "person,zebra crossing",
     "--device", "cpu"),
])
def test_unknown_label_lists_the_known_ones(argv: tuple[str, ...], tmp_path: Path, home: Path,
                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = segany_here(*argv, "--out", str(tmp_path / "out"), home=home, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1
    assert "unknown label 'zebra crossing'" in err and "Known: " in err and "person" in err
    # The vocabulary is checked once the model is loaded, before any image work; nothing is written.
    assert "embedding" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_text_with_a_box_chooses_among_the_candidates(tmp_path: Path, home: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # With a box the default was one candidate, so --text only rescored it: "person" and "giraffe" wrote the
    # same mask. Now --text keeps the 3 candidates, ranked by the phrase.
    out = tmp_path / "out"
    code, err = segany_here("predict", str(PERSON_IMAGE), "--model", "segany_tiny_labels", "--text", "person",
                            "--box", "100,50,400,400", "--out", str(out), home=home, capsys=capsys,
                            monkeypatch=monkeypatch)
    assert code == 0, err
    result = json.loads((out / f"{PERSON_IMAGE.stem}.json").read_text())
    scores = [m["score"] for m in result["masks"]]
    assert result["multimask"] is True and len(scores) == 3 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(("argv", "named"), [
    (("--text", "person", "--point", "100,100", "--points-per-side", "8"), "--points-per-side only applies"),
    (("--text", "person", "--point", "100,100", "--max-instances", "8"), "--max-instances only applies"),
    (("--point", "100,100", "--min-score", "0.5"), "--min-score only applies"),
    (("--text", "person", "--box", "10,10,200,200", "--min-score", "0.5", "--points-per-side", "4"),
     "--min-score and --points-per-side only apply"),
])
def test_text_search_options_are_refused_where_they_would_do_nothing(argv: tuple[str, ...], named: str,
                                                                      tmp_path: Path, home: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """They set the whole-image search of --text alone; with a click or a box they used to be ignored silently."""
    code, err = segany_here("predict", str(PERSON_IMAGE), "--model", "segany_tiny_labels", *argv, "--out",
                            str(tmp_path / "out"), home=home, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1 and f"{named} to --text given alone" in err, err
    assert "loading" not in err and not (tmp_path / "out").exists()
