# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""The answers of POST /api/images/{id}/annotations, on SQLite and PostgreSQL, now that the store checks a save's
label inside the save, after the uuid replay (as an edit's is), instead of the server before it.

A new save with a declared label is 201, with an undeclared, blank or too long one 422 naming the project's labels;
a retry (same uuid, annotator, mask and label) is 200 with the stored row, also when its label was a model
proposal's that the server no longer knows as proposed. A uuid that names another annotation is 409, whatever the
label: someone else's, another mask or label (it was 200 with the first row, the new save dropped without a word,
or 422 when the new label was undeclared), or another image's (409 either way; one wording now).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import SAMPLE_FILES, postgres_url  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from segany.engine.masks import decode_rle, normalize_rle
from segany.engine.store import Store, open_store
from segany.server.app import ServerSettings, _uncompressed_rle, create_app

UNDECLARED = "label 'dog' is not one of this project's labels (person, thing)"
REUSED = "already names another annotation; generate a new uuid"


def _save_answers(store: Store) -> None:
    name = f"saves-{uuid.uuid4().hex[:6]}"  # its own project and annotators: PostgreSQL's database is shared
    proj = store.create_project(name, labels=["person", "thing"])
    im, im2 = store.add_images(proj["id"], SAMPLE_FILES[:2])
    alice, bob = store.add_annotator(f"alice-{name}"), store.add_annotator(f"bob-{name}")
    alice_id = store.authenticate(alice)["id"]  # type: ignore[index]
    client = TestClient(create_app(store, None, ServerSettings(project=name)))

    def seg(image: dict[str, Any], y0: int = 20) -> dict[str, Any]:
        m = np.zeros((image["height"], image["width"]), bool)
        m[y0:y0 + 40, 30:90] = True
        return _uncompressed_rle(m)

    def post(body: dict[str, Any], tok: str = alice, image: dict[str, Any] = im) -> Any:
        return client.post(f"/api/images/{image['id']}/annotations", headers={"Authorization": f"Bearer {tok}"},
                           json=body)

    def new(label: str = "person") -> dict[str, Any]:
        return {"uuid": str(uuid.uuid4()), "segmentation": seg(im), "label": label}

    saved = new()
    first = post(saved)
    assert first.status_code == 201 and first.json()["label"] == "person", first.text  # (a)
    # (c) A proposal's save, as the server stored it ("dog" accepted as proposed), retried after a restart.
    m = np.zeros((im["height"], im["width"]), bool)
    m[100:140, 30:90] = True
    key = str(uuid.uuid4())
    proposal, _ = store.save_annotation(im["id"], mask=m, uuid=key, label="dog", source="semi",
                                        review_state="accepted", annotator_id=alice_id, project_id=proj["id"])
    proposed = {"uuid": key, "segmentation": _uncompressed_rle(m), "label": "dog", "source": "semi"}
    # The same mask spelled otherwise is the same save: compressed, and with a number written in one 5-bit group
    # more than pycocotools writes (a valid string that was stored as sent and compared as a string: a false 409).
    compressed = mask_utils.encode(np.asfortranarray(decode_rle(saved["segmentation"])))["counts"].decode()
    respelled = {**saved, "segmentation": {"size": saved["segmentation"]["size"], "counts": _longer(compressed)}}
    assert respelled["segmentation"]["counts"] != compressed
    assert normalize_rle(respelled["segmentation"]) == normalize_rle(saved["segmentation"])  # one mask, one string
    for body, row in ((saved, first.json()), (proposed, proposal), (respelled, first.json())):
        again = post(body)
        assert again.status_code == 200 and again.json() == row, again.text
    cases = [  # (what, body, annotator, image, status, fragment of the detail)
        ("(b) undeclared label", new("dog"), alice, im, 422, UNDECLARED),
        ("(d) another declared label", {**saved, "label": "thing"}, alice, im, 409, REUSED),  # was 200
        ("(d) another mask", {**saved, "segmentation": seg(im, 60)}, alice, im, 409, REUSED),  # was 200
        ("(d) an undeclared label", {**saved, "label": "dog"}, alice, im, 409, REUSED),  # was 422
        ("(d) a proposal's uuid, another mask", {**proposed, "segmentation": seg(im, 60)}, alice, im, 409,
         REUSED),  # was 200
        ("(d) another image, undeclared", {**saved, "label": "dog", "segmentation": seg(im2)}, alice, im2, 409,
         REUSED),  # was 409 "was already used on image N"
        ("(d) the same counts, height and width swapped", {**saved, "segmentation": {
            "size": saved["segmentation"]["size"][::-1], "counts": saved["segmentation"]["counts"]}}, alice, im, 409,
         REUSED),  # was 200: only the counts were compared
        ("(e) someone else's", saved, bob, im, 409, REUSED),
        ("(e) someone else's, undeclared", proposed, bob, im, 409, REUSED),  # was 422
        ("(f) blank label", new("   "), alice, im, 422, "label 'object' is not one of this project's labels"),
        ("(f) too long", new("person" + "x" * 300), alice, im, 422, f"label 'person{'x' * 194}' is not one"),
    ]
    for what, body, tok, image, status, fragment in cases:
        r = post(body, tok, image)
        assert r.status_code == status and fragment in r.json()["detail"], (what, r.text)
    assert sorted(a["uuid"] for a in store.list_annotations(project_id=proj["id"])) == sorted([saved["uuid"], key])
    stored = store.get_annotation(first.json()["id"])
    assert (stored["label"], stored["revision"]) == ("person", 1)


def _longer(counts: str) -> str:
    """``counts`` (a compressed COCO RLE string) with its first number written in one 5-bit group more: the same
    runs, a string pycocotools would not write."""
    c = [ord(ch) - 48 for ch in counts]
    i = next(j for j, v in enumerate(c) if not v & 0x20)  # the first number's last group
    c[i:i + 1] = [c[i] | 0x20, 0x1F if c[i] & 0x10 else 0]  # the sign moves into a new last group
    return "".join(chr(v + 48) for v in c)


def test_save_answers_sqlite(tmp_path: Path) -> None:
    store = open_store(tmp_path / "p", create=True)
    try:
        _save_answers(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_save_answers_postgres(postgres_url: str) -> None:
    """On PostgreSQL (the session's server; a project of its own)."""
    store = open_store(postgres_url)
    try:
        _save_answers(store)
    finally:
        store.close()
