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
