"""`segany project ...` and `segany engine ...` refuse bad input with one line, a non-zero exit and nothing
half-written (a table of cases, as in tests/bad_inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_fails
from engine_fixtures import SAMPLES

from segany.cli.main import main
from segany.engine.store import StoreError, open_store

_fails = cli_fails


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project folder with the bundled sample images."""
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["project", "add-images", str(root), str(SAMPLES)]) == 0
    return root


# ------------------------------------------------------------------------------------- opening a store
@pytest.mark.parametrize("suffix", ["", "/x.db", "/sub/dir"])
def test_existing_file_is_not_a_project(tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    _fails(["project", "create", f"{target}{suffix}"], capsys, "is a file, not a folder")
    assert target.read_text() == "mine"


def test_non_database_file_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "other.db"
    target.write_text("not sqlite")
    _fails(["project", "create", str(target)], capsys, "could not be opened as a SQLite database")


@pytest.mark.parametrize(("url", "fragment"), [
    ("foo://bar", "scheme 'foo' is not supported"),
    ("mysql://u@h/db", "scheme 'mysql' is not supported"),
    ("postgresql+nosuchdriver://u@h/db", "driver"),
])
def test_unsupported_database_urls(capsys: pytest.CaptureFixture[str], url: str, fragment: str) -> None:
    line = _fails(["project", "create", url], capsys, fragment)
    assert "postgresql://" in line or "pip install" in line


def test_unreachable_database_hides_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on localhost refuses at once: no server is started and nothing waits.
    line = _fails(["project", "create", "postgresql://nobody:s3cret@127.0.0.1:1/x"], capsys,
                  "could not reach the database")
    assert "s3cret" not in line and "127.0.0.1:1" in line


def test_open_store_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(StoreError, match="is a file"):
        open_store(tmp_path / "f", create=True)


# -------------------------------------------------------------------------------------- engine auto
@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--points-per-side", "0", "--points-per-side must be >= 1, got 0"),
    ("--min-area", "-1", "--min-area must be >= 0, got -1"),
    ("--stability-thresh", "2", "--stability-thresh must be in [0, 1], got 2"),
    ("--max-masks", "0", "--max-masks must be >= 1"),
])
def test_auto_refusals_name_the_flag(proj: Path, capsys: pytest.CaptureFixture[str], option: str, value: str,
                                     fragment: str) -> None:
    # They named AutoSettings' fields (min_mask_region_area), which `engine auto` has no flag for.
    _fails(["engine", "auto", str(proj), "--device", "cpu", f"{option}={value}"], capsys, fragment)


def test_segany_auto_refusals_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["auto", str(SAMPLES), "--out", str(tmp_path / "o"), "--points-per-batch=0"], capsys,
           "--points-per-batch must be >= 1, got 0")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ engine report
@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--dup-iou", "5", "--dup-iou"), ("--dup-iou", "nan", "--dup-iou"), ("--disagreement-iou", "-1", "between 0 and 1"),
    ("--dup-hash-bits", "65", "0-64"), ("--max-disagreement", "-1", "--max-disagreement"),
])
def test_report_option_ranges(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
                              value: str, fragment: str) -> None:
    out = tmp_path / "o" / "rep"
    _fails(["engine", "report", str(proj), "--out", str(out), "--no-model", f"{option}={value}"], capsys, fragment)
    assert not (tmp_path / "o").exists()


def test_report_out_is_a_file(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep.html"
    out.write_text("mine")
    _fails(["engine", "report", str(proj), "--out", str(out), "--no-model"], capsys, "is a file")
    assert out.read_text() == "mine"


def test_report_bad_checkpoint_leaves_no_folder(proj: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    out = tmp_path / "o" / "rep"
    _fails(["engine", "report", str(proj), "--out", str(out), "--checkpoint", str(bad), "--device", "cpu"], capsys,
           "bad.pt")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------- engine retrain
@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--lr", "-1", "--lr"), ("--lr", "nan", "--lr"), ("--batch-size", "0", "--batch-size"),
    ("--max-objects", "0", "--max-objects"), ("--eval-images", "0", "--eval-images"),
])
def test_retrain_options_checked_first(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str,
                                       value: str, fragment: str) -> None:
    out = tmp_path / "o" / "run"
    _fails(["engine", "retrain", str(proj), "--out", str(out), "--device", "cpu", f"{option}={value}"], capsys,
           fragment)
    assert not (tmp_path / "o").exists()


def test_retrain_bad_checkpoint_registers_nothing(proj: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    out = tmp_path / "o" / "run"
    _fails(["engine", "retrain", str(proj), "--out", str(out), "--checkpoint", str(bad), "--device", "cpu"], capsys,
           "bad.pt")
    assert not (tmp_path / "o").exists()
    store = open_store(proj)
    try:
        assert store.list_model_versions() == []
    finally:
        store.close()


# ------------------------------------------------------------------------------- project import-coco
def _coco(path: Path, names: list[str]) -> Path:
    square = [[10, 10, 50, 10, 50, 50, 10, 50]]
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": n, "height": 100, "width": 100} for i, n in enumerate(names, 1)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "segmentation": square}
                        for i in range(1, len(names) + 1)],
        "categories": [{"id": 1, "name": "thing"}]}))
    return path


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "does not exist"), ("{not json", "is not valid JSON"), ("[1, 2]", "not COCO instance annotations"),
    ('{"images": [{"id": 1}]}', "images[0] needs an 'id' and a 'file_name'"),
])
def test_import_coco_bad_files(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                               fragment: str) -> None:
    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    _fails(["project", "import-coco", str(proj), str(src)], capsys, fragment)


@pytest.mark.parametrize("with_dir", [False, True])
def test_import_coco_images_not_found(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      with_dir: bool) -> None:
    src = _coco(tmp_path / "in.json", ["a.jpg", "b.jpg"])
    (tmp_path / "imgs").mkdir()
    extra = ["--images-dir", str(tmp_path / "imgs")] if with_dir else []
    line = _fails(["project", "import-coco", str(proj), str(src), *extra], capsys, "nothing imported")
    assert "2 annotations" in line and "'a.jpg'" in line and ("imgs" in line) == with_dir
    store = open_store(proj)
    try:
        assert store.list_annotations() == [] and "thing" not in store.get_project()["labels"]
    finally:
        store.close()


def test_import_coco_names_what_it_skipped(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(sorted(SAMPLES.glob("*.jpg"))[0].read_bytes())  # same content as a project image
    src = _coco(tmp_path / "in.json", ["a.jpg", "b.jpg"])
    assert main(["project", "import-coco", str(proj), str(src), "--images-dir", str(imgs)]) == 0
    out, err = capsys.readouterr()
    assert "imported 1 annotations" in out
    assert "skipped 1 annotations on 1 images" in err and "'b.jpg'" in err


def test_refused_project_create_leaves_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["project", "create", str(tmp_path / "new" / "p"), "--name", "x" * 201], capsys, "1-200 characters")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ roles
def test_annotator_roles_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["project", "add-annotator", str(root), "rita", "--role", "reviewer"]) == 0
    assert main(["project", "add-annotator", str(root), "al"]) == 0
    out = capsys.readouterr()
    rita_token = out.out.split()[0]
    assert "(reviewer)" in out.err and "(annotator)" in out.err
    assert main(["project", "set-role", str(root), "al", "admin"]) == 0
    assert capsys.readouterr().out.startswith("al: annotator -> admin")
    assert main(["project", "annotators", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == ["rita\treviewer", "al\tadmin"]
    assert main(["project", "add-annotator", str(root), "rita", "--rotate", "--role", "admin"]) == 0
    new_token = capsys.readouterr().out.split()[0]
    store = open_store(root)
    try:
        assert store.authenticate(rita_token) is None
        assert store.authenticate(new_token)["role"] == "admin"
    finally:
        store.close()
    _fails(["project", "set-role", str(root), "zed", "admin"], capsys, "no annotator named 'zed'")
    _fails(["project", "set-role", str(root), "al", "boss"], capsys, "invalid choice: 'boss'", code=2)
    _fails(["project", "add-annotator", str(root), "x", "--role", "root"], capsys, "invalid choice: 'root'", code=2)


def test_remove_images_unregisters_them_with_their_annotations(tmp_path) -> None:
    """`segany project remove-images` (which `engine auto`'s "missing"/"changed" messages point to): by id, path
    or file name; annotations and done markers go, frozen versions keep their snapshots, the files stay; a name
    matching nothing removes nothing."""
    import numpy as np
    from engine_fixtures import make_images, make_project

    from segany.cli.main import main
    from segany.engine.retrain import freeze_dataset_version
    from segany.engine.versions import snapshot_items

    images = make_images(tmp_path / "images", 3)
    store, proj = make_project(tmp_path / "proj", images)
    try:
        ims = store.list_images(proj["id"])
        for im in ims:
            m = np.zeros((im["height"], im["width"]), bool)
            m[5:40, 5:40] = True
            store.save_annotation(im["id"], mask=m, label="thing")
        dv = freeze_dataset_version(store, None, held_out=0.0)
    finally:
        store.close()
    target = str(tmp_path / "proj")
    assert main(["project", "remove-images", target, "nope.jpg", str(ims[0]["id"])]) == 1  # nothing removed
    assert main(["project", "remove-images", target, str(ims[0]["id"]), ims[1]["path"]]) == 0
    from segany.engine.store import open_store

    store = open_store(target)
    try:
        left = store.list_images(proj["id"])
        assert [im["id"] for im in left] == [ims[2]["id"]]
        assert [a["image_id"] for a in store.list_annotations(project_id=proj["id"])] == [ims[2]["id"]]
        assert len(snapshot_items(store, dv["id"])) == 3  # the frozen version still describes its data
    finally:
        store.close()
    assert all(p.exists() for p in images)
