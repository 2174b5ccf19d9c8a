# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""An accept or reject (POST /api/annotations/{id}/accept|reject) is safe to send again, on SQLite, PostgreSQL and
from the page.

A retry of a review whose answer was lost (applied, but the page saw a network error) met the annotation its own
first try had changed: a false 409 (the revision it carries had moved on), a false 403 (an annotator's rejected
proposal is no longer an open proposal they may review), or, without a revision, a second application. With the
review's key (``edit_uuid``, kept as an edit's is, migration 0008) the retry is answered with the row as that
review left it, applied once; a review by someone else in between, or the key sent with another review, is still
refused (409). The page sent accepts and rejects once; it now retries them as it retries saves.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
    SAMPLE_FILES,
    app,
    auth,
    model_service,
    postgres_url,
    project,
    running_server,
    tiny_checkpoint,
    token,
)
from fastapi.testclient import TestClient
from test_server_browser import browser  # noqa: F401  (the module's Chromium fixture)

from segany.engine.store import Store, open_store
from segany.server.app import ServerSettings, create_app


def _proposals(store: Store, n: int) -> tuple[list[dict], str, str, TestClient]:
    """A new project with ``n`` machine proposals (pending, nobody's): (them, annotator alice's token, reviewer
    rita's token, a client of the project's server)."""
    proj = store.create_project(f"review-{uuid.uuid4().hex[:6]}", labels=["person", "thing"])
    im = store.add_images(proj["id"], SAMPLE_FILES[:1])[0]
    alice = store.add_annotator(f"alice-{proj['id']}")
    rita = store.add_annotator(f"rita-{proj['id']}", role="reviewer")
    m = np.zeros((im["height"], im["width"]), bool)
    m[10:40, 20:60] = True
    props = [store.save_annotation(im["id"], mask=m, source="semi", review_state="pending", project_id=proj["id"])[0]
             for _ in range(n)]
    return props, alice, rita, TestClient(create_app(store, None, ServerSettings(project=proj["name"])))


def _review(a: dict, **kw: Any) -> dict:
    """A review body as the page sends it: the annotation's uuid and revision, a fresh key; ``kw`` adds fields."""
    return {"uuid": a["uuid"], "revision": a["revision"], "edit_uuid": str(uuid.uuid4()), **kw}


def _retried_reviews(store: Store) -> None:
    (acc, rej, taken), alice, rita, client = _proposals(store, 3)

    # an annotator's accept of a proposal, sent again after a lost answer: the same row, applied once
    accept_url = f"/api/annotations/{acc['id']}/accept"
    accept = _review(acc, label="person", seconds_spent=1.5)
    first = client.post(accept_url, headers=auth(alice), json=accept)
    assert first.status_code == 200, first.text
    again = client.post(accept_url, headers=auth(alice), json={**accept, "seconds_spent": 3.0})  # (time until now)
    assert again.status_code == 200, again.text
    assert again.json() == first.json() == store.get_annotation(acc["id"])
    assert (first.json()["review_state"], first.json()["revision"]) == ("accepted", acc["revision"] + 1)
    assert first.json()["seconds_spent"] == 1.5  # counted once

    # an annotator's reject of a proposal: its retry was a 403 (a rejected proposal is no longer open to them)
    reject_url = f"/api/annotations/{rej['id']}/reject"
    reject = _review(rej, seconds_spent=0.5)
    done = [client.post(reject_url, headers=auth(alice), json=reject) for _ in range(2)]
    assert [r.status_code for r in done] == [200, 200], done[1].text
    assert done[0].json() == done[1].json() == store.get_annotation(rej["id"])
    assert (done[0].json()["review_state"], done[0].json()["revision"]) == ("rejected", rej["revision"] + 1)
    # ... for her only: another annotator sending that key is refused, as any review of it by them is
    bob = store.add_annotator(f"bob-{uuid.uuid4().hex[:6]}")
    assert client.post(reject_url, headers=auth(bob), json=reject).status_code == 403

    # the key sent with another review (the other action, or another revision) is refused, naming what differs
    rev = acc["revision"] + 1
    mine = _review(acc, revision=rev, label="person")
    assert client.post(accept_url, headers=auth(rita), json=mine).status_code == 200
    for action, body, field in (("reject", {k: v for k, v in mine.items() if k != "label"}, "review_state"),
                                ("accept", {**mine, "revision": rev + 1}, "revision")):
        r = client.post(f"/api/annotations/{acc['id']}/{action}", headers=auth(rita), json=body)
        # (worded for a review: "another edit" read oddly for an accept or a reject)
        said = (f"edit_uuid {mine['edit_uuid']} was already used for another change to annotation {acc['id']} "
                f"(this {action} differs from it in {field}); send a new edit_uuid for each new {action}")
        assert r.status_code == 409 and said in r.json()["detail"], (action, r.text)
    assert store.get_annotation(acc["id"])["revision"] == rev + 1  # (rita's accept, once)

    # a real conflict stays one: rita rejected a proposal first, so another reviewer's accept of the revision he
    # saw is a 409 (an annotator's is a 403 before that: the proposal is no longer open to them) ...
    r = client.post(f"/api/annotations/{taken['id']}/reject", headers=auth(rita), json=_review(taken))
    assert r.status_code == 200, r.text
    ray = store.add_annotator(f"ray-{uuid.uuid4().hex[:6]}", role="reviewer")
    late = client.post(f"/api/annotations/{taken['id']}/accept", headers=auth(ray),
                       json=_review(taken, label="person"))
    assert late.status_code == 409 and "someone edited it" in late.json()["detail"], late.text
    assert store.get_annotation(taken["id"])["review_state"] == "rejected"
    # ... and a retry of a review once someone else has reviewed the annotation since is judged as a new review:
    # rita's accept (her key) after ray's reject is a 409, alice's first accept a 403; neither undoes ray's
    assert client.post(f"/api/annotations/{acc['id']}/reject", headers=auth(ray),
                       json=_review(acc, revision=rev + 1)).status_code == 200
    stale = client.post(accept_url, headers=auth(rita), json=mine)
    assert stale.status_code == 409 and "someone edited it" in stale.json()["detail"], stale.text
    stale = client.post(accept_url, headers=auth(alice), json=accept)
    assert stale.status_code == 403 and "after another person's review" in stale.json()["detail"], stale.text
    now = store.get_annotation(acc["id"])
    assert (now["review_state"], now["revision"]) == ("rejected", rev + 2)


def test_a_retried_review_is_applied_once_sqlite(tmp_path: Path) -> None:
    store = open_store(tmp_path / "p", create=True)
    try:
        _retried_reviews(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_a_retried_review_is_applied_once_postgres(postgres_url: str) -> None:  # noqa: F811
    """On PostgreSQL (the session's server; a project of its own)."""
    store = open_store(postgres_url)
    try:
        _retried_reviews(store)
    finally:
        store.close()


@pytest.mark.browser
def test_the_page_retries_an_accept_whose_answer_was_lost(browser: Any, app: Any, project: Any,  # noqa: F811
                                                          token: str) -> None:
    """The first accept reaches the server and is applied, but the page gets a network error instead of the
    answer (the route fetches it, then aborts): the page sends it again, with the same key, and shows it accepted;
    the server applied it once."""
    store, proj = project
    im = store.list_images(proj["id"])[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[20:80, 30:120] = True
    prop, _ = store.save_annotation(im["id"], mask=m, source="semi")  # pending, nobody's
    sent: list[dict] = []

    def lose_first_answer(route: Any) -> None:
        sent.append(route.request.post_data_json)
        if len(sent) == 1:
            route.fetch()  # applied on the server ...
            route.abort("connectionreset")  # ... and the answer lost
        else:
            route.continue_()

    with running_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.route("**/api/annotations/*/accept", lose_first_answer)
        # Reviewing needs no clicks: the page decodes on the server instead of exporting and loading its own
        # decoder (seconds on 2 cores).
        page.route("**/api/model/decoder_*.onnx", lambda route: route.abort())
        page.goto(f"{base}/#token={token}")
        page.wait_for_function(f"document.getElementById('status').dataset.ready === '1' && "
                               f"document.querySelector(\"#pending li[data-id='{prop['id']}']\")", timeout=60_000)
        page.locator(f"#pending li[data-id='{prop['id']}'] .accept-pending").click()
        page.wait_for_function(f"!document.querySelector(\"#pending li[data-id='{prop['id']}']\") && "
                               f"document.querySelector(\"#annotations li[data-id='{prop['id']}']\")")
        assert "failed" not in page.locator("#status").text_content()
        page.close()
    assert len(sent) == 2 and sent[0]["edit_uuid"] == sent[1]["edit_uuid"]
    now = store.get_annotation(prop["id"])
    assert (now["review_state"], now["revision"]) == ("accepted", prop["revision"] + 1)  # once
