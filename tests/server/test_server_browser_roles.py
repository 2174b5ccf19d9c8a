# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""Roles in the annotation app (real Chromium): an annotator sees another person's annotation and pending mask
with their delete and review buttons disabled, and the tooltip saying which role they need; a machine proposal
nobody owns stays open to them; a reviewer gets every button."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
    admin_token,
    app,
    model_service,
    project,
    reviewer_token,
    running_server,
    tiny_checkpoint,
    token,
)
from test_server_browser import _open, browser  # noqa: F401  (the module's Chromium fixture)

pytestmark = pytest.mark.browser

BUTTONS = """(() => [...document.querySelectorAll('#annotations li, #pending li')].map((li) =>
  [li.dataset.id, [...li.querySelectorAll('button')].map((b) => [b.disabled, b.title])]))()"""


def _saved_mask(store: Any, proj: dict, token: str, **extra: Any) -> tuple[int, dict, np.ndarray, dict]:
    """The signed-in annotator's (``token``'s) id, the project's first image, a box mask on it and a saved
    annotation of theirs with that mask."""
    alice = store.authenticate(token)["id"]
    im = store.list_images(proj["id"])[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[20:80, 30:120] = True
    saved, _ = store.save_annotation(im["id"], mask=m, annotator_id=alice, label="person", **extra)
    return alice, im, m, saved


def test_review_controls_follow_the_role(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                         reviewer_token: str) -> None:
    store, proj = project
    bob_token = store.add_annotator("bob")
    alice, im, m, alices = _saved_mask(store, proj, token)
    taken, _ = store.save_annotation(im["id"], mask=m, source="semi", review_state="pending", annotator_id=alice)
    proposal, _ = store.save_annotation(im["id"], mask=m, source="semi")  # pending, nobody's
    with running_server(app) as base:
        page = _open(browser, base, bob_token)
        assert page.locator("#who").text_content() == "bob (annotator)"
        rows = dict(page.evaluate(BUTTONS))
        (edit_off, edit_why), (off, why) = rows[str(alices["id"])]  # ✎ and ✕
        assert off and "deleting it needs the reviewer or admin role (you are annotator)" in why
        assert edit_off and "editing it needs the reviewer or admin role (you are annotator)" in edit_why
        assert all(off and "reviewing it needs the reviewer or admin role" in why for off, why in rows[str(taken["id"])])
        assert not any(off for off, _ in rows[str(proposal["id"])])  # a machine proposal: open to annotators
        page.locator(f"#annotations li[data-id='{alices['id']}']").click()
        page.keyboard.press("Delete")  # the key is refused in the page, without a confirm box or a 403
        page.wait_for_function("document.getElementById('status').textContent.startsWith('not deleted')")
        assert store.get_annotation(alices["id"])["review_state"] == "accepted"
        page.close()

        page = _open(browser, base, reviewer_token)
        assert page.locator("#who").text_content() == "rita (reviewer)"
        rows = dict(page.evaluate(BUTTONS))
        # every button on (a saved row's ✓ is off only because it is accepted already)
        assert len(rows) == 3 and not any(off and why != "already accepted" for b in rows.values() for off, why in b)
        page.locator(f"#pending li[data-id='{taken['id']}'] .reject-pending").click()
        page.wait_for_function(f"!document.querySelector(\"#pending li[data-id='{taken['id']}']\")")
        assert store.get_annotation(taken["id"])["review_state"] == "rejected"
        page.close()


def test_reviewer_reviews_saved_annotations_in_the_page(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                                        reviewer_token: str) -> None:
    """A reviewer's saved rows have ✓ and ⊘ and show the review state; an annotator gets neither on another's."""
    store, proj = project
    bob_token = store.add_annotator("bob")
    alice, _, _, alices = _saved_mask(store, proj, token)
    row = f"#annotations li[data-id='{alices['id']}']"
    with running_server(app) as base:
        page = _open(browser, base, bob_token)
        assert page.locator(f"{row} .accept-saved, {row} .reject-saved").count() == 0
        assert page.locator(f"{row} .state").text_content() == "accepted"
        page.close()

        page = _open(browser, base, reviewer_token)
        assert page.locator(f"{row} .accept-saved").is_disabled()  # already accepted
        page.locator(f"{row} .reject-saved").click()
        page.wait_for_function(f"document.querySelector(\"{row} .state\").textContent === 'rejected'")
        ann = store.get_annotation(alices["id"])
        assert ann["review_state"] == "rejected" and ann["annotator_id"] == alice
        assert page.locator(f"{row} .accept-saved").is_enabled() and page.locator(f"{row} .reject-saved").is_disabled()
        page.close()


def test_refused_delete_refreshes_the_list(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                           reviewer_token: str) -> None:
    """Alice's page is open; a reviewer accepts her annotation meanwhile: her ✕ is refused (403), the message is
    shown, and the list is fetched again, so the ✕ is now disabled; her unsaved mask stays."""
    store, proj = project
    _, _, _, x = _saved_mask(store, proj, token)
    row = f"#annotations li[data-id='{x['id']}']"
    with running_server(app) as base:
        page = _open(browser, base, token)
        assert page.locator(f"{row} .delete").is_enabled()
        page.evaluate("window.segany.mask = new Uint8Array(window.segany.W * window.segany.H).fill(1)")
        req = urllib.request.Request(f"{base}/api/annotations/{x['id']}/accept", data=json.dumps({}).encode(),
                                     headers={"Authorization": f"Bearer {reviewer_token}",
                                              "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req) as res:
            assert res.status == 200
        page.on("dialog", lambda d: d.accept())
        page.locator(f"{row} .delete").click()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('not deleted: 403')")
        page.wait_for_function(f"document.querySelector(\"{row} .delete\").disabled")
        assert store.get_annotation(x["id"]) is not None
        assert page.evaluate("window.segany.mask.every((v) => v === 1)")
        page.close()


def test_admin_changes_stage_and_labels_in_the_page(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                                    admin_token: str) -> None:
    """An admin's Project box PATCHes /api/project (stage semi, one more label): the API reports both, the label
    choices follow, and semi pre-fills the open image; a refused value shows the server's error; annotators lack
    the box."""
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        assert page.locator("#project-group").is_hidden()
        page.close()

        page = _open(browser, base, admin_token)
        assert page.locator("#project-group").is_visible()
        assert page.locator("#project-labels").input_value() == "person, thing"
        page.locator("#project-stage").select_option("semi")
        page.locator("#project-labels").fill("person, thing, car")
        page.locator("#project-labels").press("n")  # typing in the field: no shortcut (N would open the next image)
        assert page.locator("#project-labels").input_value() == "person, thing, carn"
        page.locator("#project-labels").fill("person, thing, car")
        page.locator("#project-save").click()
        page.wait_for_function("window.segany.project.stage === 'semi'")
        assert page.evaluate("window.segany.idx") == 0
        req = urllib.request.Request(f"{base}/api/project", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req) as res:
            got = json.loads(res.read())
        assert got["stage"] == "semi" and got["labels"] == ["person", "thing", "car"]
        assert page.evaluate("[...document.querySelectorAll('#labels option')].map((o) => o.value)") == [
            "person", "thing", "car"]
        page.wait_for_function("!document.getElementById('prefill').disabled")  # semi: the open image was pre-filled
        page.evaluate("""(() => { const o = document.createElement('option'); o.value = 'bogus';
            document.getElementById('project-stage').appendChild(o); })()""")
        page.locator("#project-stage").select_option("bogus")
        page.locator("#project-save").click()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('project not saved: 422')")
        assert store.get_project(proj["name"])["stage"] == "semi"
        page.close()


def test_admin_adds_images_in_the_page(browser: Any, app: Any, project: Any, admin_token: str,  # noqa: F811
                                       tmp_path: Any) -> None:
    """Add images (Project box): one new file is added, one with pixels already in the project is skipped, and a
    broken file is refused by name; the status line says all three and the image list grows by one."""
    from annotation_fixtures import SAMPLE_FILES

    store, proj = project
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dup = tmp_path / "same_pixels.jpg"
    dup.write_bytes(SAMPLE_FILES[0].read_bytes())
    with running_server(app) as base:
        page = _open(browser, base, admin_token)
        assert page.evaluate("window.segany.images.length") == 2
        page.locator("#project-upload").set_input_files([str(SAMPLE_FILES[2]), str(dup), str(broken)])
        page.wait_for_function("document.getElementById('status').textContent.startsWith('added')", timeout=60_000)
        status = page.locator("#status").text_content()
        assert status.startswith("added 1 image, 1 already in the project, refused: broken.jpg (400:"), status
        assert page.evaluate("window.segany.images.length") == 3
        assert page.locator("#image-pos").text_content() == "1/3"
        assert [im["file_name"] for im in store.list_images(proj["id"])][-1].endswith(SAMPLE_FILES[2].name)
        page.close()


def test_first_images_of_an_empty_project_open_at_once(browser: Any, model_service: Any, tmp_path: Any) -> None:  # noqa: F811
    """A new project has no images: an admin uploads one in the page and it opens, ready to click."""
    from annotation_fixtures import SAMPLE_FILES

    from segany.engine.store import open_store
    from segany.server.app import ServerSettings, create_app

    store = open_store(tmp_path / "empty", create=True)
    store.create_project("empty", media_dir=tmp_path / "empty" / "images")
    tok = store.add_annotator("adam", role="admin")
    with running_server(create_app(store, model_service, ServerSettings())) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{base}/#token={tok}")
        page.wait_for_function("document.getElementById('status').textContent.includes('has no images')")
        assert "Add images" in page.locator("#status").text_content()
        page.locator("#project-upload").set_input_files([str(SAMPLE_FILES[1])])
        page.wait_for_function("document.getElementById('status').dataset.ready === '1' && "
                               "document.body.dataset.decoder && window.segany.W > 0", timeout=60_000)
        assert page.locator("#image-pos").text_content() == "1/1"
        page.close()
