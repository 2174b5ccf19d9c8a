# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""Roles in the annotation app (real Chromium): an annotator sees another person's annotation and pending mask
with their delete and review buttons disabled, and the tooltip saying which role they need; a machine proposal
nobody owns stays open to them; a reviewer gets every button."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
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


def test_review_controls_follow_the_role(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                         reviewer_token: str) -> None:
    store, proj = project
    bob_token = store.add_annotator("bob")
    alice = store.authenticate(token)["id"]  # type: ignore[index]
    im = store.list_images(proj["id"])[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[20:80, 30:120] = True
    alices, _ = store.save_annotation(im["id"], mask=m, annotator_id=alice, label="person")
    taken, _ = store.save_annotation(im["id"], mask=m, source="semi", review_state="pending", annotator_id=alice)
    proposal, _ = store.save_annotation(im["id"], mask=m, source="semi")  # pending, nobody's
    with running_server(app) as base:
        page = _open(browser, base, bob_token)
        assert page.locator("#who").text_content() == "bob (annotator)"
        rows = dict(page.evaluate(BUTTONS))
        (off, why), = rows[str(alices["id"])]
        assert off and "deleting it needs the reviewer or admin role (you are annotator)" in why
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
        assert len(rows) == 3 and not any(off for buttons in rows.values() for off, _ in buttons)
        page.locator(f"#pending li[data-id='{taken['id']}'] .reject-pending").click()
        page.wait_for_function(f"!document.querySelector(\"#pending li[data-id='{taken['id']}']\")")
        assert store.get_annotation(taken["id"])["review_state"] == "rejected"
        page.close()
