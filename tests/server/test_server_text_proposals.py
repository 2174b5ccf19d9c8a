# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""Text proposals skip the declared-label check only as proposed (text audit finding 1): the exact mask the
server sent, saved with its label and source "semi". Before, one proposal of a label on an image let any mask
of any source be saved there under that label, and ``min_score=0`` forced proposals of any class."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from annotation_fixtures import auth, label_app, project, token  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient

from segany.engine.masks import decode_rle
from segany.server.app import _uncompressed_rle


def _save(client: TestClient, token: str, image_id: int, segmentation: dict[str, Any], label: str,
          source: str) -> Any:
    body = {"uuid": str(uuid.uuid4()), "segmentation": segmentation, "label": label, "source": source}
    return client.post(f"/api/images/{image_id}/annotations", headers=auth(token), json=body)


def test_only_the_proposed_mask_keeps_an_undeclared_label(label_app: Any, token: str) -> None:
    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    got = client.post(f"/api/images/{im['id']}/text", headers=auth(token),
                      json={"text": "dog", "min_score": 0.0, "max_masks": 2}).json()
    assert got["label"] == "dog" and got["proposals"], got
    proposed = got["proposals"][0]["segmentation"]
    hand = np.zeros((im["height"], im["width"]), bool)
    hand[:5, :5] = True
    for seg, source in ((_uncompressed_rle(hand), "manual"), (_uncompressed_rle(hand), "semi"), (proposed, "manual")):
        r = _save(client, token, im["id"], seg, "dog", source)
        assert r.status_code == 422 and "'dog' is not one of this project's labels" in r.json()["detail"], r.text
    edited = decode_rle(proposed)
    edited[:5, :5] = ~edited[:5, :5]  # a proposal edited by hand is a hand-drawn mask
    assert _save(client, token, im["id"], _uncompressed_rle(edited), "dog", "semi").status_code == 422
    assert _save(client, token, im["id"], proposed, "person", "semi").status_code == 201  # declared: always fine
    # The proposal itself, in either RLE form the API takes, keeps the model's label.
    r = _save(client, token, im["id"], _uncompressed_rle(decode_rle(proposed)), "dog", "semi")
    assert r.status_code == 201 and r.json()["label"] == "dog", r.text


def test_proposed_masks_are_bounded_and_keyed_by_image_label_and_mask() -> None:
    from segany.server.app import _ProposedMasks

    seen = _ProposedMasks(size=2)
    masks = [np.zeros((8, 8), bool) for _ in range(3)]
    for i, m in enumerate(masks):
        m[i, i] = True
        seen.add(1, "dog", _uncompressed_rle(m))
    assert not seen.was_proposed(1, "dog", _uncompressed_rle(masks[0]))  # the oldest was dropped
    assert seen.was_proposed(1, "dog", _uncompressed_rle(masks[2]))
    assert not seen.was_proposed(2, "dog", _uncompressed_rle(masks[2]))
    assert not seen.was_proposed(1, "cat", _uncompressed_rle(masks[2]))
    assert not seen.was_proposed(1, "dog", {"size": [8, 8], "counts": [1, 2]})  # not a mask: not proposed


def test_a_proposal_takes_the_projects_spelling_of_its_label(label_app: Any, token: str,
                                                              project: tuple[Any, dict[str, Any]]) -> None:
    """A project that declares "Dog" gets "Dog" proposals for "dogs" (they were "dog": accepted as proposed,
    they started a second class beside the project's "Dog" in every export)."""
    store, proj = project
    store.update_project(proj["id"], labels=["Dog", "person"])
    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    got = client.post(f"/api/images/{im['id']}/text", headers=auth(token),
                      json={"text": "the dogs", "min_score": 0.0, "max_masks": 1}).json()
    assert got["label"] == "Dog" and [p["label"] for p in got["proposals"]] == ["Dog"], got
    saved = _save(client, token, im["id"], got["proposals"][0]["segmentation"], "Dog", "semi")
    assert saved.status_code == 201 and saved.json()["label"] == "Dog", saved.text


def test_open_vocabulary_labels_keep_their_hyphens_and_match_declared_ones() -> None:
    from segany.server.model_service import proposal_label

    assert proposal_label("The T-Shirts.", (), ()) == "t-shirts"  # was "t shirts"
    assert proposal_label("x-ray_film", (), ()) == "x-ray film"
    assert proposal_label("T-shirts", (), ["person", "T-shirt"]) == "T-shirt"
    assert proposal_label("t shirt", (), ["T-shirt"]) == "T-shirt"
    assert proposal_label("persons", ("dog", "person"), ()) == "person"  # a closed vocabulary's class
    assert proposal_label("a zebra", ("dog", "person"), ["Dog"]) == "zebra"  # an open-vocabulary phrase


def test_a_proposal_saved_before_a_restart_is_answered_when_retried(label_app: Any, token: str,
                                                                   project: Any) -> None:
    """A proposal keeps its undeclared label only while the server remembers proposing it. A retry of its save
    after a restart (the answer was lost; the page sends the same uuid again) is the stored row, 200, not 422;
    a new save under that label is still refused (422), and someone else's under that uuid is a conflict (409)."""
    from segany.server.app import create_app

    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    got = client.post(f"/api/images/{im['id']}/text", headers=auth(token),
                      json={"text": "dog", "min_score": 0.0, "max_masks": 1}).json()
    body = {"uuid": str(uuid.uuid4()), "segmentation": got["proposals"][0]["segmentation"], "label": "dog",
            "source": "semi"}
    first = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=body)
    assert first.status_code == 201, first.text
    restarted = TestClient(create_app(project[0], label_app.state.model))  # remembers no proposal
    again = restarted.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=body)
    assert again.status_code == 200 and again.json() == first.json(), again.text
    assert len(project[0].list_annotations(image_id=im["id"])) == 1
    other = project[0].add_annotator("bob")  # the same uuid from someone else is not their retry: a reused key
    assert restarted.post(f"/api/images/{im['id']}/annotations", headers=auth(other), json=body).status_code == 409
    fresh = {**body, "uuid": str(uuid.uuid4())}  # a new save of the same mask: the label check applies again
    assert restarted.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=fresh).status_code == 422
