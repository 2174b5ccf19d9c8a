"""`segany project import-coco` keys annotations on content, per project, in one transaction (audit findings 1, 4
and 12), and `project add-images` names every unreadable file (finding 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails
from engine_fixtures import make_images

from segany.cli.main import main
from segany.engine.masks import decode_rle, encode_mask
from segany.engine.store import open_store
from segany.errors import InputError


def _square(h: int, w: int, x0: int, y0: int, side: int) -> dict:
    m = np.zeros((h, w), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return encode_mask(m)


def _coco(path: Path, images: list[Path], *, shift: int = 0, extra: list[dict] | None = None) -> Path:
    """Three annotations (RLE) on the first two images; ``shift`` moves the first mask (an edit)."""
    from PIL import Image

    ims = []
    for i, p in enumerate(images[:2], 1):
        with Image.open(p) as im:
            ims.append({"id": i, "file_name": p.name, "width": im.width, "height": im.height})
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": _square(ims[0]["height"], ims[0]["width"], 5 + shift, 5, 20)},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0,
             "segmentation": _square(ims[0]["height"], ims[0]["width"], 40, 40, 15)},
            {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 0,
             "segmentation": _square(ims[1]["height"], ims[1]["width"], 10, 30, 25)}]
    path.write_text(json.dumps({"images": ims, "annotations": anns + (extra or []),
                                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bag"}]}))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[Path]]:
    images = make_images(tmp_path / "imgs", 3)
    root = tmp_path / "proj"
    assert main(["project", "create", str(root), "--name", "first"]) == 0
    assert main(["project", "add-images", str(root), str(tmp_path / "imgs")]) == 0
    return root, images


def _anns(root: Path, project: str | None = None) -> list[dict]:
    store = open_store(root)
    try:
        return store.list_annotations(project_id=store.get_project(project)["id"])
    finally:
        store.close()


def _import(root: Path, src: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    assert main(["project", "import-coco", str(root), str(src), *extra]) == 0
    return capsys.readouterr().out


def test_reimport_is_keyed_on_content_not_path(setup: tuple[Path, list[Path]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root, images = setup
    src = _coco(tmp_path / "gt.json", images)
    assert "imported 3 annotations, updated 0, unchanged 0" in _import(root, src, capsys)
    assert "imported 0 annotations, updated 0, unchanged 3" in _import(root, src, capsys)
    copy = tmp_path / "elsewhere" / "copy.json"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    assert "imported 0 annotations, updated 0, unchanged 3" in _import(root, copy, capsys)  # no duplicates
    assert len(_anns(root)) == 3

    _coco(src, images, shift=7)  # one mask edited in place
    assert "imported 0 annotations, updated 1, unchanged 2" in _import(root, src, capsys)
    anns = _anns(root)
    assert len(anns) == 3
    first = decode_rle(anns[0]["segmentation"])
    assert first[5:25, 12:32].all() and not first[5:25, 5:12].any()  # the edit is stored, not ignored


def test_same_images_in_a_second_project(setup: tuple[Path, list[Path]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, images = setup
    src = _coco(tmp_path / "gt.json", images)
    _import(root, src, capsys)
    store = open_store(root)
    store.create_project("second")
    store.close()
    out = _import(root, src, capsys, "--project", "second", "--images-dir", str(tmp_path / "imgs"))
    assert "imported 3 annotations" in out and "added 2 images" in out
    assert len(_anns(root, "second")) == 3 and len(_anns(root, "first")) == 3


def test_failed_import_writes_nothing(setup: tuple[Path, list[Path]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, images = setup
    store = open_store(root)
    store.create_project("second")
    store.close()
    bad = {"id": 9, "image_id": 2, "category_id": 1, "segmentation": _square(10, 10, 0, 0, 3)}  # wrong size
    src = _coco(tmp_path / "gt.json", images, extra=[bad])
    cli_fails(["project", "import-coco", str(root), str(src), "--project", "second", "--images-dir",
               str(tmp_path / "imgs")], capsys, "does not match image")
    store = open_store(root)
    try:
        second = store.get_project("second")
        assert store.list_images(second["id"]) == [] and second["labels"] == []
        assert store.list_annotations(project_id=second["id"]) == []
    finally:
        store.close()


def test_crowd_and_unknown_categories_are_counted(setup: tuple[Path, list[Path]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root, images = setup
    from PIL import Image

    with Image.open(images[0]) as im:
        h, w = im.height, im.width
    extra = [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": _square(h, w, 60, 5, 10)},
             {"id": 11, "image_id": 1, "category_id": 77, "iscrowd": 0, "segmentation": _square(h, w, 80, 5, 10)}]
    src = _coco(tmp_path / "gt.json", images, extra=extra)
    out = _import(root, src, capsys)
    assert "imported 4 annotations" in out and "1 crowd regions" in out
    assert "1 with a category_id not in the file's categories" in out
    out = _import(root, src, capsys, "--include-crowd")
    assert "imported 1 annotations" in out and len(_anns(root)) == 5


# ------------------------------------------------------------------------------------------ add-images
def test_add_images_lists_every_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "imgs"
    make_images(folder, 2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "img00.png").read_bytes()[:200])  # truncated
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    line = cli_fails(["project", "add-images", str(root), str(folder)], capsys, "3 file(s) are not readable")
    assert all(name in line for name in ("empty.jpg", "notes.png", "cut.png")) and "--skip-invalid" in line
    store = open_store(root)
    assert store.list_images(store.get_project()["id"]) == []
    store.close()
    assert main(["project", "add-images", str(root), str(folder), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "added 2 images" in out and "skipped 3 unreadable" in out and "cut.png" in out


def test_file_imported_by_an_older_version_is_updated_not_duplicated(setup: tuple[Path, list[Path]],
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import uuid

    root, images = setup
    src = _coco(tmp_path / "gt.json", images)
    first = json.loads(src.read_text())["annotations"][0]
    old_key = uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, str(src.resolve())), "1")  # how imports were keyed
    store = open_store(root)
    try:
        im = store.list_images(store.get_project()["id"])[0]
        store.save_annotation(im["id"], rle=first["segmentation"], uuid=str(old_key), label="person")
    finally:
        store.close()
    _coco(src, images, shift=7)
    assert "imported 2 annotations, updated 1, unchanged 0" in _import(root, src, capsys)
    assert len(_anns(root)) == 3


def test_single_bad_image_gets_no_flag_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    line = cli_fails(["project", "add-images", str(root), str(bad)], capsys, "x.jpg")
    assert "--skip-invalid" not in line and "JPEG, PNG" in line


def test_coco_names_find_images_uploaded_in_the_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The app stores an upload as <sha12>-<name>; a COCO file made elsewhere says <name>. It matches, unless
    two uploads were sent under that name (then the file names neither, and nothing is imported)."""
    import hashlib

    images = make_images(tmp_path / "imgs", 3)
    up = tmp_path / "uploads"
    up.mkdir()
    for p in images[:2]:
        shutil.copy(p, up / f"{hashlib.sha256(p.read_bytes()).hexdigest()[:12]}-{p.name}")
    root = tmp_path / "proj"
    assert main(["project", "create", str(root)]) == 0
    assert main(["project", "add-images", str(root), str(up)]) == 0
    src = _coco(tmp_path / "gt.json", images)
    assert "imported 3 annotations" in _import(root, src, capsys)
    assert len(_anns(root)) == 3

    # Two different uploads sent as the first image's name: the name is ambiguous, so it matches neither.
    other = images[2]
    twin = up / f"{hashlib.sha256(other.read_bytes()).hexdigest()[:12]}-{images[0].name}"
    shutil.copy(other, twin)
    assert main(["project", "add-images", str(root), str(twin)]) == 0
    capsys.readouterr()
    out = _import(root, src, capsys)
    assert "unchanged 1" in out and "skipped 2" in out  # the second image's one; the first's two are unmatched


def test_a_mask_held_twice_is_added_once_and_counted_as_a_duplicate(
        setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two annotations of the file (ids 1 and 4) with the same mask and label on one image: one row, and the
    output says why the other was not added (it used to be counted "unchanged" on a first import)."""
    root, images = setup
    first = json.loads(_coco(tmp_path / "gt.json", images).read_text())["annotations"][0]
    src = _coco(tmp_path / "gt.json", images, extra=[{**first, "id": 4}])
    out = _import(root, src, capsys)
    assert out.startswith("imported 3 annotations, updated 0, unchanged 0, skipped 0")
    assert "; 1 not added: the same mask and label are already on their image" in out
    assert len(_anns(root)) == 3
    out = _import(root, src, capsys)  # again: the three keys are stored, the copy is still a duplicate
    assert out.startswith("imported 0 annotations, updated 0, unchanged 3, skipped 0") and "; 1 not added" in out

    from segany.engine import exports

    store = open_store(root)
    try:
        r = exports.import_coco_summary(store, store.get_project(None)["id"], src)
    finally:
        store.close()
    assert (r.created, r.unchanged, r.duplicate, r.already_present) == (0, 3, 1, 4)


def test_images_sharing_a_name_keep_their_own_masks_through_export_and_import(tmp_path: Path) -> None:
    # a/img.png and b/img.png: the export named both "img.png" and the import put both masks on b's picture.
    from segany.engine.exports import export_coco, import_coco_summary
    from segany.engine.retrain import freeze_dataset_version
    from segany.engine.versions import export_version_coco

    made = make_images(tmp_path / "src", 2)
    files = []
    for folder, src in zip(("a", "b"), made, strict=True):
        (tmp_path / folder).mkdir()
        files.append(Path(shutil.copy(src, tmp_path / folder / "img.png")))
    store = open_store(tmp_path / "p1", create=True)
    p1 = store.create_project("one", media_dir=tmp_path / "p1" / "media", labels=[])
    boxes = {}
    for k, im in enumerate(store.add_images(p1["id"], files)):
        store.save_annotation(im["id"], rle=_square(im["height"], im["width"], 5 + 40 * k, 5, 20), label="x",
                              project_id=p1["id"], review_state="accepted")
        boxes[Path(im["path"]).parent.name] = [5 + 40 * k, 5, 20, 20]
    coco = json.loads(export_coco(store, p1["id"], tmp_path / "c.json").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == ["a/img.png", "b/img.png"]
    freeze_dataset_version(store, None, held_out=0.0)
    frozen = json.loads(Path(export_version_coco(store, None, "v1", tmp_path / "v1.json")["path"]).read_text())
    assert sorted(im["file_name"] for im in frozen["images"]) == ["a/img.png", "b/img.png"]

    for name, src in (("p2", tmp_path / "c.json"), ("p3", tmp_path / "v1.json")):
        other = open_store(tmp_path / name, create=True)
        p = other.create_project(name, media_dir=tmp_path / name / "media", labels=[])
        ims = other.add_images(p["id"], files)
        assert import_coco_summary(other, p["id"], src).created == 2
        got = {Path(im["path"]).parent.name: [a["bbox"] for a in other.list_annotations(project_id=p["id"],
                                                                                         image_id=im["id"])]
               for im in ims}
        assert got == {folder: [box] for folder, box in boxes.items()}, (name, got)

    # A file made elsewhere that names both pictures "img.png" is refused, naming them, and imports nothing.
    coco["images"] = [{**im, "file_name": "img.png"} for im in coco["images"]]
    (tmp_path / "plain.json").write_text(json.dumps(coco))
    other = open_store(tmp_path / "p4", create=True)
    p4 = other.create_project("four", media_dir=tmp_path / "p4" / "media", labels=[])
    other.add_images(p4["id"], files)
    with pytest.raises(InputError, match=r"match more than one image.*a/img.png.*b/img.png.*nothing was imported"):
        import_coco_summary(other, p4["id"], tmp_path / "plain.json")
    assert other.list_annotations(project_id=p4["id"]) == []


def test_a_name_found_in_images_dir_is_that_file_not_a_project_image_ending_alike(tmp_path: Path) -> None:
    # ds1/images/0001.png is in the project; the COCO file's images/0001.png under --images-dir ds2 is another
    # picture. Matching by the end of the path alone put its mask on ds1's picture.
    from segany.engine.exports import import_coco_summary

    made = make_images(tmp_path / "src", 2)
    files = []
    for folder, src in zip(("ds1", "ds2"), made, strict=True):
        (tmp_path / folder / "images").mkdir(parents=True)
        files.append(Path(shutil.copy(src, tmp_path / folder / "images" / "0001.png")))
    from PIL import Image

    with Image.open(files[1]) as im:
        w, h = im.size
    coco = {"images": [{"id": 1, "file_name": "images/0001.png", "width": w, "height": h}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": _square(h, w, 5, 5, 10)}],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    for holds in ([files[0]], files):
        name = f"p{len(holds)}"
        store = open_store(tmp_path / name, create=True)
        p = store.create_project(name, media_dir=tmp_path / name / "media", labels=[])
        store.add_images(p["id"], holds)
        assert import_coco_summary(store, p["id"], tmp_path / "c.json", images_dir=tmp_path / "ds2").created == 1
        owner = {im["id"]: im["path"] for im in store.list_images(p["id"])}
        assert [owner[a["image_id"]] for a in store.list_annotations(project_id=p["id"])] == [str(files[1])], name
        store.close()


def test_a_reimport_that_adds_nothing_declares_no_label(tmp_path: Path) -> None:
    # Re-importing a project's own export added nothing, yet said "added labels object" and declared it.
    from segany.engine.exports import export_coco, import_coco_summary

    made = make_images(tmp_path / "imgs", 1)
    store = open_store(tmp_path / "p", create=True)
    p = store.create_project("one", media_dir=tmp_path / "p" / "media", labels=[])
    im = store.add_images(p["id"], made)[0]
    store.save_annotation(im["id"], rle=_square(im["height"], im["width"], 5, 5, 20), label="object",
                          project_id=p["id"], review_state="accepted")
    export_coco(store, p["id"], tmp_path / "c.json")
    assert store.get_project("one")["labels"] == []
    out = import_coco_summary(store, p["id"], tmp_path / "c.json")
    assert out.created == 0 and out.duplicate == 1 and out.labels_added == []
    assert store.get_project("one")["labels"] == []
