# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""Roles on the annotation API: annotators own their masks and take machine proposals, reviewers review
anyone's, admins change the project; every refusal is a 403 that names the role needed."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
    admin_token,
    app,
    auth,
    model_service,
    project,
    reviewer_token,
    tiny_checkpoint,
    token,
)
from fastapi.testclient import TestClient

from segany.server.app import _uncompressed_rle


@pytest.fixture
def client(app: Any) -> TestClient:
    return TestClient(app)


@pytest.fixture
def bob(project: Any) -> str:
    """A second annotator."""
    return project[0].add_annotator("bob")


def _save(client: TestClient, tok: str) -> dict[str, Any]:
    im = client.get("/api/images", headers=auth(tok)).json()[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[20:60, 30:90] = True
    r = client.post(f"/api/images/{im['id']}/annotations", headers=auth(tok),
                    json={"uuid": str(uuid.uuid4()), "segmentation": _uncompressed_rle(m), "label": "person"})
    assert r.status_code == 201, r.text
    return r.json()


def test_me_reports_the_role(client: TestClient, token: str, reviewer_token: str, admin_token: str) -> None:
    for tok, role in ((token, "annotator"), (reviewer_token, "reviewer"), (admin_token, "admin")):
        me = client.get("/api/me", headers=auth(tok)).json()
        assert me["role"] == role and me["annotator"]["role"] == role


def test_annotator_cannot_review_edit_or_delete_anothers(client: TestClient, token: str, bob: str,
                                                          reviewer_token: str, project: Any) -> None:
    a = _save(client, token)
    for method, path, body in (("POST", f"/api/annotations/{a['id']}/accept", {}),
                               ("POST", f"/api/annotations/{a['id']}/reject", {}),
                               ("PATCH", f"/api/annotations/{a['id']}", {"review_state": "rejected"}),
                               ("DELETE", f"/api/annotations/{a['id']}", None)):
        r = client.request(method, path, headers=auth(bob), json=body)
        assert r.status_code == 403, (method, path, r.text)
        detail = r.json()["detail"]
        assert "needs the reviewer or admin role" in detail and "you (bob) are annotator" in detail
        assert "\n" not in detail
    assert project[0].get_annotation(a["id"])["review_state"] == "accepted"  # nothing changed
    own = client.post(f"/api/annotations/{a['id']}/reject", headers=auth(token), json={})
    assert own.status_code == 200 and own.json()["review_state"] == "rejected"  # one's own: allowed
    assert own.json()["reviewer_id"] == a["annotator_id"]  # a review of one's own is recorded too
    rita = _id(client, reviewer_token)
    r = client.post(f"/api/annotations/{a['id']}/accept", headers=auth(reviewer_token), json={"seconds_spent": 3})
    assert r.status_code == 200 and r.json()["review_state"] == "accepted"
    # The review is recorded beside the annotator, who still drew the mask (and whose time it is).
    assert (r.json()["annotator_id"], r.json()["reviewer_id"]) == (a["annotator_id"], rita)
    assert r.json()["reviewed_at"] and r.json()["seconds_spent"] == a["seconds_spent"]
    m = np.zeros((a["segmentation"]["size"]), bool)
    m[10:40, 10:40] = True
    e = client.patch(f"/api/annotations/{a['id']}", headers=auth(reviewer_token),
                     json={"segmentation": _uncompressed_rle(m), "label": "thing"})
    assert e.status_code == 200 and (e.json()["annotator_id"], e.json()["reviewer_id"]) == (a["annotator_id"], rita)
    # Still the annotator's mask, but the review stands: they cannot overturn, edit or delete it any more.
    for method, body in (("POST", {}), ("PATCH", {"label": "dog"}), ("DELETE", None)):
        path = f"/api/annotations/{a['id']}" + ("/reject" if method == "POST" else "")
        r = client.request(method, path, headers=auth(token), json=body)
        assert r.status_code == 403 and "your annotation after another person's review" in r.json()["detail"], r.text
    assert project[0].get_annotation(a["id"])["review_state"] == "accepted"
    assert client.delete(f"/api/annotations/{a['id']}", headers=auth(reviewer_token)).status_code == 204


def _id(client: TestClient, tok: str) -> int:
    return int(client.get("/api/me", headers=auth(tok)).json()["annotator"]["id"])


def test_project_changes_need_admin(client: TestClient, token: str, reviewer_token: str, admin_token: str,
                                    project: Any) -> None:
    for tok in (token, reviewer_token):
        r = client.patch("/api/project", headers=auth(tok), json={"stage": "semi", "labels": ["x"]})
        assert r.status_code == 403 and "changing the project (stage, labels) needs the admin role" in \
            r.json()["detail"]
    assert project[0].get_project()["stage"] == "manual"
    r = client.patch("/api/project", headers=auth(admin_token), json={"stage": "semi"})
    assert r.status_code == 200 and r.json()["stage"] == "semi"


def test_annotator_reviews_prefills_in_the_semi_stage(client: TestClient, token: str, bob: str,
                                                     reviewer_token: str, admin_token: str) -> None:
    assert client.patch("/api/project", headers=auth(admin_token), json={"stage": "semi"}).status_code == 200
    im = client.get("/api/images", headers=auth(token)).json()[0]
    pending = client.post(f"/api/images/{im['id']}/prefill", headers=auth(token)).json()
    assert len(pending) == 2 and all(p["annotator_id"] is None for p in pending)
    # A machine proposal nobody owns: an annotator may not delete it (rejecting keeps it for retraining) ...
    r = client.delete(f"/api/annotations/{pending[1]['id']}", headers=auth(bob))
    assert r.status_code == 403 and "reject it instead" in r.json()["detail"]
    # ... but may accept or reject it, and accepting makes it theirs.
    alice, bob_id, rita = _id(client, token), _id(client, bob), _id(client, reviewer_token)
    ok = client.post(f"/api/annotations/{pending[0]['id']}/accept", headers=auth(token), json={})
    assert ok.status_code == 200 and ok.json()["review_state"] == "accepted"
    assert (ok.json()["annotator_id"], ok.json()["reviewer_id"]) == (alice, alice) and ok.json()["reviewed_at"]
    no = client.post(f"/api/annotations/{pending[1]['id']}/reject", headers=auth(bob), json={})
    assert no.status_code == 200 and no.json()["review_state"] == "rejected"
    # Rejecting a proposal does not make it bob's: nobody drew it, and he cannot delete the model's mistake.
    assert (no.json()["annotator_id"], no.json()["reviewer_id"]) == (None, bob_id)
    assert client.delete(f"/api/annotations/{pending[1]['id']}", headers=auth(bob)).status_code == 403
    taken = client.post(f"/api/annotations/{pending[0]['id']}/reject", headers=auth(bob), json={})
    assert taken.status_code == 403  # alice took it: for bob it is another person's now
    r = client.post(f"/api/annotations/{pending[0]['id']}/reject", headers=auth(reviewer_token), json={})
    assert r.status_code == 200 and r.json()["review_state"] == "rejected"
    assert (r.json()["annotator_id"], r.json()["reviewer_id"]) == (alice, rita)
