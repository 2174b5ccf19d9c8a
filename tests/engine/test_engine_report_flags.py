"""`segany engine report` lists what to check and changes nothing unless --demote (audit finding 11b), and
flags empty masks already in the store (finding 8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from engine_fixtures import make_images

from segany.cli.main import main
from segany.engine.db import Annotation
from segany.engine.masks import encode_mask
from segany.engine.store import open_store


def _project(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Two accepted masks that are exact duplicates and one empty mask (stored as older versions allowed)."""
    root = tmp_path / "proj"
    store = open_store(root, create=True)
    try:
        p = store.create_project("p")
        im = store.add_images(p["id"], make_images(tmp_path / "imgs", 1))[0]
        m = np.zeros((im["height"], im["width"]), bool)
        m[10:40, 10:40] = True
        first, _ = store.save_annotation(im["id"], mask=m)
        dup, _ = store.save_annotation(im["id"], mask=m)
        enc = encode_mask(np.zeros_like(m))
        with store.transaction() as s:
            empty = Annotation(uuid="00000000-0000-4000-8000-0000000000e0", image_id=im["id"], label="object",
                               rle_counts=enc["counts"], height=im["height"], width=im["width"], area=0,
                               bbox_xywh=[0.0, 0.0, 0.0, 0.0], source="manual", review_state="accepted",
                               prompts={}, revision=1)
            s.add(empty)
            s.flush()
            empty_id = empty.id
    finally:
        store.close()
    return root, {"first": first["id"], "dup": dup["id"], "empty": empty_id}


def _states(root: Path) -> dict[int, str]:
    store = open_store(root)
    try:
        return {a["id"]: a["review_state"] for a in store.list_annotations()}
    finally:
        store.close()


def test_report_flags_without_changing_data_unless_demote(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    root, ids = _project(tmp_path)
    assert main(["engine", "report", str(root), "--out", str(tmp_path / "r1"), "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "2 masks flagged" in out and "--demote" in out
    flags = json.loads((tmp_path / "r1" / "flags.json").read_text())["masks"]
    reasons = {(f["annotation_id"], f["reason"]) for f in flags}
    assert {(ids["dup"], "duplicate_mask"), (ids["empty"], "empty_mask")} <= reasons
    assert set(_states(root).values()) == {"accepted"}  # the report changed nothing

    assert main(["engine", "report", str(root), "--out", str(tmp_path / "r2"), "--no-model", "--demote"]) == 0
    assert "2 sent to the review queue" in capsys.readouterr().out
    states = _states(root)
    assert (states[ids["first"]], states[ids["dup"]], states[ids["empty"]]) == ("accepted", "pending", "pending")


def test_of_two_duplicates_the_lower_predicted_iou_is_flagged_even_at_zero() -> None:
    """A predicted IoU of 0.0 counted as 1.0 (``or 1.0``), so the better duplicate was flagged (and, with
    --demote, taken out of exports); a hand-drawn mask (None) still counts as sure."""
    from segany.engine.masks import encode_mask as enc
    from segany.engine.report import duplicate_masks

    m = np.zeros((20, 20), bool)
    m[2:9, 3:12] = True
    seg = enc(m)
    ann = [{"id": 1, "image_id": 1, "segmentation": seg, "predicted_iou": 0.0},
           {"id": 2, "image_id": 1, "segmentation": seg, "predicted_iou": 0.5},
           {"id": 3, "image_id": 2, "segmentation": seg, "predicted_iou": 0.9},
           {"id": 4, "image_id": 2, "segmentation": seg, "predicted_iou": None}]
    assert [(a, b) for a, b, _ in duplicate_masks(ann, 0.9)] == [(2, 1), (4, 3)]


def test_a_versions_section_describes_its_snapshot_not_the_live_masks(tmp_path: Path) -> None:
    """Masks edited, deleted and rejected and an image removed after the freeze changed the version's section
    (10 masks on 5 images became 7); it also counted every image of the project, not the version's."""
    from segany.engine.report import ReportSettings, build_report
    from segany.engine.retrain import freeze_dataset_version

    store = open_store(tmp_path / "proj", create=True)
    try:
        p = store.create_project("p")
        ims = store.add_images(p["id"], make_images(tmp_path / "imgs", 6))
        ids = []
        for im in ims[:5]:
            for k in range(2):
                m = np.zeros((im["height"], im["width"]), bool)
                m[10 + 20 * k:30 + 20 * k, 10:40 + 10 * k] = True
                ids.append(store.save_annotation(im["id"], mask=m, predicted_iou=0.5 + 0.1 * k)[0]["id"])
        freeze_dataset_version(store, None, held_out=0.2)
        bigger = np.zeros((ims[0]["height"], ims[0]["width"]), bool)
        bigger[:100, :100] = True
        store.update_annotation(ids[0], project_id=p["id"], mask=bigger)
        store.delete_annotation(ids[3], project_id=p["id"])
        store.update_annotation(ids[5], project_id=p["id"], review_state="rejected")
        store.remove_images(p["id"], [ims[4]["file_name"]])
        report = build_report(store, None, tmp_path / "report", ReportSettings())["report"]
    finally:
        store.close()
    (version,) = [v for v in report["versions"] if v["key"] != "live"]
    assert (version["images"], version["masks"]) == (5, 10)
    assert version["masks_per_image"]["mean"] == 2.0 and version["by_source"] == {"manual": 10}
    assert version["relative_area"]["p90"] < 0.1  # the 100x100 edit is not in it


def test_near_duplicate_images_are_flagged_per_group_not_per_pair(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Near-duplicate images were flagged pair by pair: 300 frames of a still camera were 44,850 flags, and
    20,000 would build 200 million tuples. Each group is one flag now: its images, its first pairs and how many
    more it has."""
    from segany.engine import near_dupes, report
    from segany.engine.db import Image
    from segany.engine.report import ReportSettings, build_report

    store = open_store(tmp_path / "proj", create=True)
    try:
        p = store.create_project("p")
        names = [f"frame{i}" for i in range(300)] + ["a", "b", "alone"]
        with store.transaction() as s:  # rows only: the files are never read, their dHash is stubbed below
            s.add_all([Image(project_id=p["id"], path=f"/nowhere/{name}.png", file_name=f"{name}.png", width=8,
                             height=8, sha256=f"{k:064x}") for k, name in enumerate(names)])
        hashes = {"a": 0xFF00, "b": 0xFF01, "alone": 0xFFFF_0000_0000}
        monkeypatch.setattr(near_dupes, "dhash", lambda path: hashes.get(Path(path).stem, 0xF0F0))
        monkeypatch.setattr(report, "_plots", lambda *a: [])
        monkeypatch.setattr(report, "_throughput_plot", lambda *a: None)
        flags = build_report(store, None, tmp_path / "r", ReportSettings())["report"]["image_flags"]
    finally:
        store.close()
    assert len(flags) == 2
    from segany.engine.report import MAX_PAIRS_PER_GROUP

    frames, pair = flags
    assert frames["image_ids"] == list(range(1, 301)) and len(frames["pairs"]) == MAX_PAIRS_PER_GROUP
    assert frames["pairs"][0] == {"image_id": 1, "duplicate_of": 2, "hash_bits": 0}
    assert frames["pairs_left_out"] == 300 * 299 // 2 - MAX_PAIRS_PER_GROUP
    assert pair == {"reason": "near_duplicate_images", "image_ids": [301, 302], "pairs_left_out": 0,
                    "pairs": [{"image_id": 301, "duplicate_of": 302, "hash_bits": 1}]}
    assert "and 44830 more" in (tmp_path / "r" / "index.html").read_text()


def test_the_report_folder_is_written_whole_and_never_over_other_files(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # `--out ~` wrote index.html, report.json and plots over whatever the folder held; and a report rerun into
    # the same folder kept the plots of dataset versions that no longer exist.
    root, ids = _project(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "index.html").write_text("my page")
    assert main(["engine", "report", str(root), "--out", str(home), "--no-model", "--demote"]) == 1
    err = capsys.readouterr().err
    assert "not a segany report" in err and "--force" in err
    assert [p.name for p in home.iterdir()] == ["index.html"] and (home / "index.html").read_text() == "my page"
    assert set(_states(root).values()) == {"accepted"}, "--demote ran for a report that was refused"

    out = tmp_path / "weekly"
    assert main(["engine", "report", str(root), "--out", str(out), "--no-model"]) == 0
    (out / "dv99_distributions.png").write_bytes(b"a plot of a version since deleted")  # as an older report's
    (out / ".segany-export").unlink()  # a report written before reports were marked
    assert main(["engine", "report", str(root), "--out", str(out), "--no-model"]) == 0, capsys.readouterr().err
    assert not (out / "dv99_distributions.png").exists() and (out / "report.json").is_file()
    (out / "notes.txt").write_text("mine")
    assert main(["engine", "report", str(root), "--out", str(out), "--no-model"]) == 1
    assert "holds 1 file it did not write (notes.txt)" in capsys.readouterr().err
    assert main(["engine", "report", str(root), "--out", str(out), "--no-model", "--force"]) == 0
    assert not (out / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weekly.")], "a temporary folder was left"

    exported = tmp_path / "masks"
    assert main(["project", "export", str(root), "png", str(exported)]) == 0
    capsys.readouterr()
    assert main(["engine", "report", str(root), "--out", str(exported), "--no-model"]) == 1
    assert "is a segany export, not a report" in capsys.readouterr().err
    assert main(["project", "export", str(root), "png", str(out)]) == 1
    assert "is a segany report, not an export" in capsys.readouterr().err
    assert main(["engine", "report", str(root), "--out", str(root), "--no-model"]) == 1
    assert f"such as {root.parent / 'report'}" in capsys.readouterr().err  # not ".../export"
