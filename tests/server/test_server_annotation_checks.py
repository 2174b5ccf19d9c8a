# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""The annotation save path refuses what a dataset must not hold (audit finding 8): an empty mask, and a label
the project does not declare, each a 422 with one line naming the fix; and an annotator refused on an imported
mask is not told to reject it when rejecting is refused too (finding 11)."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import auth, label_app, project, token  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient

from segany.server.app import _uncompressed_rle, create_app


@pytest.fixture
def client(project: Any) -> TestClient:
    return TestClient(create_app(project[0], None))  # store only: these routes need no model


def _body(h: int, w: int, *, empty: bool = False, label: str = "person") -> dict[str, Any]:
    m = np.zeros((h, w), bool)
    if not empty:
        m[20:60, 30:90] = True
    return {"uuid": str(uuid.uuid4()), "segmentation": _uncompressed_rle(m), "label": label}


def _one_line_422(r: Any, fragment: str) -> str:
    detail = r.json()["detail"]
    assert r.status_code == 422 and isinstance(detail, str) and "\n" not in detail and fragment in detail, r.text
    return detail


def test_empty_masks_and_undeclared_labels_are_refused(client: TestClient, token: str, project: Any) -> None:
    store = project[0]
    im = client.get("/api/images", headers=auth(token)).json()[0]
    url = f"/api/images/{im['id']}/annotations"
    zero = {"uuid": str(uuid.uuid4()), "label": "person",
            "segmentation": {"size": [im["height"], im["width"]], "counts": [im["height"] * im["width"]]}}
    _one_line_422(client.post(url, headers=auth(token), json=zero), "mask is empty")
    detail = _one_line_422(client.post(url, headers=auth(token), json=_body(im["height"], im["width"],
                                                                              label="nolabel")), "'nolabel'")
    assert "person, thing" in detail
    assert store.count_annotations() == 0
    # Calling a save a proposal does not skip the check: only labels this server's text prompts proposed do.
    claimed = {**_body(im["height"], im["width"], label="persn"), "source": "semi"}
    _one_line_422(client.post(url, headers=auth(token), json=claimed), "'persn'")
    ok = client.post(url, headers=auth(token), json=_body(im["height"], im["width"]))
    assert ok.status_code == 201
    a = ok.json()
    path = f"/api/annotations/{a['id']}"
    _one_line_422(client.patch(path, headers=auth(token), json={"label": "nolabel"}), "not one of this project")
    empty = _body(im["height"], im["width"], empty=True)["segmentation"]
    _one_line_422(client.patch(path, headers=auth(token), json={"segmentation": empty}), "mask is empty")
    _one_line_422(client.post(f"{path}/accept", headers=auth(token), json={"label": "nolabel"}), "nolabel")
    kept = store.get_annotation(a["id"])
    assert kept["label"] == "person" and kept["area"] == 40 * 60 and kept["revision"] == 1


def test_refusal_on_an_imported_mask_does_not_suggest_rejecting(client: TestClient, token: str,
                                                                project: Any) -> None:
    store, _ = project
    im = client.get("/api/images", headers=auth(token)).json()[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[5:25, 5:25] = True
    imported, _ = store.save_annotation(im["id"], mask=m, label="person")  # accepted, nobody's: as import-coco
    for method, suffix in (("DELETE", ""), ("POST", "/reject")):
        r = client.request(method, f"/api/annotations/{imported['id']}{suffix}", headers=auth(token),
                           json={} if method == "POST" else None)
        assert r.status_code == 403, r.text
        assert "nobody owns" in r.json()["detail"] and "reject it instead" not in r.json()["detail"]


def test_a_text_proposal_keeps_the_models_label(label_app: Any, token: str, project: Any) -> None:
    """An accepted text-prompt proposal keeps the label the model proposed ("dog", which this project does not
    declare): it comes from the model's vocabulary, not from a typo."""
    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    got = client.post(f"/api/images/{im['id']}/text", headers=auth(token), json={"text": "dog"}).json()
    assert got["label"] == "dog" and got["proposals"], got
    proposal = {"uuid": str(uuid.uuid4()), "segmentation": got["proposals"][0]["segmentation"], "label": "dog",
                "source": "semi"}
    r = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=proposal)
    assert r.status_code == 201, r.text
    other = client.get("/api/images", headers=auth(token)).json()[1]
    elsewhere = {**_body(other["height"], other["width"], label="dog"), "source": "semi"}
    r = client.post(f"/api/images/{other['id']}/annotations", headers=auth(token), json=elsewhere)
    _one_line_422(r, "'dog' is not one of this project's labels")  # proposed for the first image only
