# ruff: noqa: F811  (pytest fixtures are imported and used as arguments)
"""Web app audit 3, in real Chromium: what the page does while an image is still loading, when answers come late
or twice, and when loading fails.

One server and one browser serve the whole module (each test opens its own page, mostly with server-side
decoding so no test waits for onnxruntime-web). Requests are held, failed or answered by ``page.route``, so the
order of events is fixed rather than timed.
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import SAMPLE_FILES, served_demo_project, tiny_checkpoint  # noqa: F401
from test_server_browser import browser  # noqa: F401  (the module's Chromium fixture)

pytestmark = pytest.mark.browser

READY = "document.getElementById('status').dataset.ready === '1' && document.body.dataset.decoder"
STATUS = "document.getElementById('status').textContent"


def _rotated_tiff(path: Path) -> Path:
    """A small TIFF whose EXIF orientation (6: rotate 90°) the model applies: stored 200x150, seen 150x200."""
    from PIL import Image

    with Image.open(SAMPLE_FILES[2]) as im:
        small = im.convert("RGB").resize((200, 150))
    exif = Image.Exif()
    exif[0x0112] = 6
    small.save(path, format="TIFF", exif=exif)
    return path


@pytest.fixture(scope="module")
def env(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
        onnx_cache: Path) -> Iterator[dict[str, Any]]:
    """A project with two JPEGs and a TIFF, an annotator's token, and the running server's base URL."""
    tmp = tmp_path_factory.mktemp("audit3")
    files = [*SAMPLE_FILES[:2], _rotated_tiff(tmp / "rotated.tif")]
    with served_demo_project(tiny_checkpoint, tmp, files, onnx_cache) as served:
        store = served["store"]
        yield {**served, "token": store.add_annotator("alice"), "images": store.list_images(served["project"]["id"])}


def _page(browser: Any, env: dict[str, Any], image: int | None = None, wait: bool = True) -> Any:  # noqa: F811
    """A page signed in as the annotator, on ``image`` (an id; default the first), decoding on the server."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.route("**/api/model/decoder_*.onnx", lambda route: route.abort())
    query = f"?image={image}" if image is not None else ""
    page.goto(f"{env['base']}/{query}#token={env['token']}")
    if wait:
        page.wait_for_function(READY, timeout=60_000)
    return page


def _click(page: Any, fx: float = 0.5, fy: float = 0.5) -> None:
    box = page.locator("#view").bounding_box()
    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)


def _anns(env: dict[str, Any], image_id: int, states: tuple[str, ...] = ("accepted",)) -> list[dict[str, Any]]:
    return env["store"].list_annotations(project_id=env["project"]["id"], image_id=image_id, states=list(states))


def _until(page: Any, cond: Any, what: str) -> None:
    """Let the page run (its route handlers included) until ``cond()`` holds, at most 10 s."""
    for _ in range(500):
        if cond():
            return
        page.wait_for_timeout(20)
    raise AssertionError(f"timed out waiting for {what}")


def _mask_px(page: Any) -> int | None:
    return page.evaluate("window.segany.mask ? window.segany.mask.reduce((a, b) => a + b, 0) : null")


class _Hold:
    """A page.route handler that holds the requests it matches (all, or only the n-th ones) until released."""

    def __init__(self, which: set[int] | None = None, method: str | None = None) -> None:
        self.which, self.method, self.seen, self.held = which, method, 0, []

    def __call__(self, route: Any) -> None:
        if self.method and route.request.method != self.method:
            route.continue_()
            return
        self.seen += 1
        if self.which is None or self.seen in self.which:
            self.held.append(route)
        else:
            route.continue_()

    def release(self) -> None:
        while self.held:
            self.held.pop(0).continue_()


def _fail_first(status: int, detail: str) -> Any:
    """A page.route handler that answers the first request it matches with ``status`` and lets the rest through."""
    seen = {"n": 0}

    def handler(route: Any) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            route.fulfill(status=status, content_type="application/json", body=json.dumps({"detail": detail}))
        else:
            route.continue_()

    return handler


def test_token_rejected_while_opening_an_image_blocks_clicks_until_it_reloads(browser: Any,  # noqa: F811
                                                                              env: dict[str, Any]) -> None:
    """Bug 1: image B's file is refused (401) while B opens; after signing in again the canvas still shows A until
    B has loaded: a click or Enter then must not add a point, unlock clicks, or save anything to B."""
    a, b = env["images"][0], env["images"][1]
    page = _page(browser, env, a["id"])
    page.route(f"**/api/images/{b['id']}/file", _fail_first(401, "invalid or revoked token"))
    embedding = _Hold(which={2})  # the reload's embedding waits: B is still loading after the sign-in
    page.route(f"**/api/images/{b['id']}/embedding", embedding)
    page.keyboard.press("n")
    page.wait_for_selector("#login:not([hidden])")
    page.wait_for_function(f"{STATUS}.startsWith('could not load')")
    page.locator("#token").fill(env["token"])
    page.locator("#login button[type=submit]").click()
    page.wait_for_selector("#login", state="hidden")
    assert page.evaluate("[window.segany.idx, window.segany.W]") == [1, a["width"]]  # B's index, A's picture
    _click(page)
    page.keyboard.press("Enter")  # nothing to save: must not unlock clicks either
    _click(page, 0.3, 0.3)
    assert page.evaluate("window.segany.points.length") == 0
    assert page.evaluate("document.getElementById('status').dataset.ready") == "0"
    _until(page, lambda: embedding.held, "signing in again to reload the image")
    embedding.release()
    page.wait_for_function(READY)
    assert page.evaluate("[window.segany.W, window.segany.H]") == [b["width"], b["height"]]
    _click(page)
    page.wait_for_function("window.segany.mask !== null && window.segany.candidates.length === 3")
    assert _anns(env, b["id"]) == [] and not page.errors
    page.close()


def test_accept_saves_once_and_a_repeat_reuses_the_uuid(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 2: Enter, Enter and a held Enter while the save is on its way give one annotation; a save refused and
    sent again carries the same uuid. Enter on the focused Keyboard summary opens it and saves nothing."""
    im = env["images"][0]
    before = len(_anns(env, im["id"]))
    page = _page(browser, env, im["id"])
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    bodies: list[dict[str, Any]] = []
    answers = iter(["refuse", "hold"])

    def post(route: Any) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        bodies.append(json.loads(route.request.post_data))
        if next(answers, "pass") == "refuse":
            route.fulfill(status=422, content_type="application/json", body='{"detail": "label: try again"}')
        else:
            held.append(route)

    held: list[Any] = []
    page.route(f"**/api/images/{im['id']}/annotations", post)
    page.keyboard.press("Enter")
    page.wait_for_function(f"{STATUS}.startsWith('save failed: 422')")
    page.keyboard.press("Enter")
    _until(page, lambda: held, "the second save")
    page.keyboard.press("a")
    page.keyboard.down("Enter")
    page.keyboard.down("Enter")  # a held key: repeat
    page.keyboard.up("Enter")
    assert bodies[0]["uuid"] == bodies[1]["uuid"]  # the same mask: the same uuid
    held[0].continue_()
    page.wait_for_selector("#annotations li")
    page.wait_for_function(f"{STATUS}.startsWith('saved annotation')")
    page.wait_for_timeout(300)  # (time for any further save to arrive: there must be none)
    assert len(_anns(env, im["id"])) == before + 1 and len(bodies) == 2
    # Enter on the focused Keyboard summary opens the box; it does not save the mask
    _click(page, 0.3, 0.3)
    page.wait_for_function("window.segany.mask !== null")
    page.focus("details summary")
    page.keyboard.press("Enter")
    assert page.evaluate("document.querySelector('details').open") and len(bodies) == 2
    assert not page.errors
    page.close()


def test_late_decode_answer_does_not_undo_a_newer_edit(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 3: a decode answer that arrives after Esc, Undo or Accept is dropped."""
    im = env["images"][0]
    page = _page(browser, env, im["id"])
    assert page.evaluate("document.body.dataset.decoder") == "server"
    hold = _Hold()
    page.route(f"**/api/images/{im['id']}/decode", hold)

    def late(edit: Any) -> None:
        """Click, hold its decode, make ``edit``, then let the answer in and wait until the page has read it."""
        drops = page.evaluate("window.segany.staleDrops || 0")
        _click(page, 0.4, 0.6)
        _until(page, lambda: hold.held, "the decode request")
        edit()
        with page.expect_response(f"**/api/images/{im['id']}/decode"):
            hold.release()
        page.wait_for_function(f"(window.segany.staleDrops || 0) > {drops}", timeout=10_000)

    late(lambda: page.keyboard.press("Escape"))
    assert page.evaluate("window.segany.points.length") == 0 and _mask_px(page) is None
    # one click answered, a second one late, then Undo: the first click's mask stays
    page.unroute(f"**/api/images/{im['id']}/decode")
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    first = _mask_px(page)
    page.route(f"**/api/images/{im['id']}/decode", hold)
    late(lambda: page.keyboard.press("u"))
    assert page.evaluate("window.segany.points.length") == 1 and _mask_px(page) == first
    # Accept (or a choice of candidate) while the next click decodes is refused: the mask shown is not yet the
    # mask of the prompts. Saving it stored a mask whose prompts listed a click it never saw (web app audit 4).
    before = len(_anns(env, im["id"]))
    _click(page, 0.4, 0.6)
    _until(page, lambda: hold.held, "the decode request")
    chosen = page.evaluate("window.segany.chosen")
    page.keyboard.press("Enter")
    page.keyboard.press(str((chosen + 1) % 3 + 1))  # another candidate of the mask shown
    page.wait_for_function(f"{STATUS}.startsWith('the mask is still being computed')")
    assert len(_anns(env, im["id"])) == before and page.evaluate("window.segany.chosen") == chosen
    with page.expect_response(f"**/api/images/{im['id']}/decode"):
        hold.release()
    page.wait_for_function(f"{STATUS}.startsWith('the mask is ready')")
    page.keyboard.press("Enter")
    page.wait_for_function(f"{STATUS}.startsWith('saved annotation')")
    (saved,) = [a for a in _anns(env, im["id"])][before:]
    assert len(saved["prompts"]["points"]) == 2 and not page.errors
    page.close()


def test_a_failed_decode_takes_its_click_back_and_esc_can_be_undone(browser: Any, env: dict[str, Any]  # noqa: F811
                                                                     ) -> None:
    """Web app audit 4: after a decode failed, the click stayed drawn and was saved in the prompts of the earlier
    mask; Esc wiped the undo history, so one stray key lost the whole mask."""
    im = env["images"][1]
    page = _page(browser, env, im["id"])
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    first = _mask_px(page)
    page.route(f"**/api/images/{im['id']}/decode", _fail_first(500, "decoder crashed"))
    _click(page, 0.3, 0.3)
    page.wait_for_function(f"{STATUS}.startsWith('decode failed')")
    assert page.evaluate("window.segany.points.length") == 1 and _mask_px(page) == first
    page.keyboard.press("Escape")
    assert page.evaluate("window.segany.points.length") == 0 and _mask_px(page) is None
    page.keyboard.press("Control+z")
    assert page.evaluate("window.segany.points.length") == 1 and _mask_px(page) == first
    assert not page.errors
    page.close()


def test_failed_image_load_is_said_and_retried(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 4: a 5xx from the embedding route names the image and the failure, and Retry (or R) opens it again.
    The previous picture's bitmap is released when the next one replaces it."""
    a, b = env["images"][0], env["images"][1]
    page = _page(browser, env, a["id"])
    page.route(f"**/api/images/{b['id']}/embedding", _fail_first(500, "model crashed"))
    page.evaluate("window.oldPicture = window.segany.img")
    page.keyboard.press("n")
    page.wait_for_function(f"{STATUS}.startsWith('could not load')")
    status = page.locator("#status").get_attribute("title") or page.locator("#status").inner_text()
    assert b["file_name"] in status and "embedding" in status and "model crashed" in status
    assert page.locator("#retry").is_visible()
    _click(page)
    assert page.evaluate("window.segany.points.length") == 0
    page.locator("#retry").click()
    page.wait_for_function(READY)
    assert page.evaluate("[window.segany.idx, window.segany.W, window.segany.H]") == [1, b["width"], b["height"]]
    assert page.evaluate("window.oldPicture.width") == 0  # closed
    assert not page.locator("#retry").is_visible()
    page.close()


def test_tiff_is_served_as_png_in_the_models_frame(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 5: Chromium cannot decode TIFF: the server sends a PNG of the pixels the model sees (EXIF-rotated), so
    the page opens it, and its frame is the image's."""
    from PIL import Image

    from segany.data.images import load_image

    tif = env["images"][2]
    assert tif["file_name"].endswith(".tif") and (tif["width"], tif["height"]) == (150, 200)
    req = urllib.request.Request(f"{env['base']}/api/images/{tif['id']}/file",
                                 headers={"Authorization": f"Bearer {env['token']}"})
    with urllib.request.urlopen(req) as res:
        assert res.headers["Content-Type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(res.read())))
    path = env["store"].get_image(env["project"]["id"], tif["id"])["path"]
    assert np.array_equal(got, load_image(path))
    jpg = env["images"][0]  # browsers decode JPEG: sent as stored
    req = urllib.request.Request(f"{env['base']}/api/images/{jpg['id']}/file",
                                 headers={"Authorization": f"Bearer {env['token']}"})
    with urllib.request.urlopen(req) as res:
        assert res.headers["Content-Type"] == "image/jpeg"
    page = _page(browser, env, tif["id"])
    assert page.evaluate("[window.segany.W, window.segany.H]") == [150, 200]
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    assert page.evaluate("window.segany.mask.length") == 150 * 200 and not page.errors
    page.close()


def test_review_twice_quickly_and_prefill_merges(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 6: Y Y accepts two pending masks. F merges its answer into the list: a page-only text proposal stays."""
    store, im = env["store"], env["images"][1]
    m = np.zeros((im["height"], im["width"]), bool)
    m[10:60, 20:90] = True
    ids = [store.save_annotation(im["id"], mask=m, source="semi")[0]["id"] for _ in range(2)]
    extra = store.save_annotation(im["id"], mask=m, source="semi")[0]
    page = _page(browser, env, im["id"])
    page.wait_for_function("window.segany.pending.length === 3")
    page.keyboard.press("y")
    page.keyboard.press("y")
    page.wait_for_function("window.segany.pending.length === 1 && !window.segany.reviewing.size", timeout=10_000)
    states = {a["id"]: a["review_state"] for a in _anns(env, im["id"], ("accepted", "pending"))}
    assert [states[i] for i in ids] == ["accepted", "accepted"] and states[extra["id"]] == "pending"
    # a text proposal lives only in the page; the pre-fill's answer (here: the pending mask again) keeps it
    page.evaluate("""(() => { const S = window.segany, p = S.pending[0];
        S.pending.push(Object.assign({}, p, {id: 'text-1', _proposal: true, prompts: {text: 'dog'}, score: 0.9})); })()""")
    req = urllib.request.Request(f"{env['base']}/api/images/{im['id']}/annotations?state=pending",
                                 headers={"Authorization": f"Bearer {env['token']}"})
    with urllib.request.urlopen(req) as res:
        prefill = json.load(res)
    assert [a["id"] for a in prefill] == [extra["id"]]
    page.route(f"**/api/images/{im['id']}/prefill",
               lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(prefill)))
    page.keyboard.press("f")
    page.wait_for_function(f"{STATUS}.startsWith('1 pre-filled')")
    assert page.evaluate("window.segany.pending.map((a) => String(a.id))") == [str(extra["id"]), "text-1"]
    assert not page.errors
    page.close()


def test_failed_save_on_an_image_left_is_said(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 7: leaving while the mask is being saved asks nothing (it is not unsaved); its failure still shows."""
    a = env["images"][0]
    page = _page(browser, env, a["id"])
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    hold = _Hold(method="POST")
    page.route(f"**/api/images/{a['id']}/annotations", hold)
    page.keyboard.press("Enter")
    page.wait_for_function("window.segany.saves.length === 1")
    page.keyboard.press("n")
    page.wait_for_function(READY)
    assert dialogs == [] and page.evaluate("window.segany.idx") == 1
    _until(page, lambda: hold.held, "the save request")
    hold.held.pop().fulfill(status=422, content_type="application/json", body='{"detail": "label: not allowed"}')
    page.wait_for_selector("#notice:not([hidden])")
    text = page.locator("#notice").inner_text()
    assert a["file_name"] in text and "not saved" in text and "not allowed" in text
    page.close()


def test_start_failure_other_than_401_is_said(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Bug 8: a 5xx from /api/me or /api/images at start is named in the status bar, not left at 'loading…'."""
    for path, what in (("me", "could not sign in: 503"), ("images", "could not list the project's images: 503")):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.route(f"**/api/{path}", lambda route: route.fulfill(status=503, content_type="application/json",
                                                                body='{"detail": "database down"}'))
        page.goto(f"{env['base']}/#token={env['token']}")
        page.wait_for_function(f"{STATUS}.startsWith({what!r})")
        assert "database down" in page.locator("#status").inner_text()
        page.close()


def test_validation_and_network_errors_read_as_sentences(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Web app audit 4: a 422 showed FastAPI's raw JSON list, a lost connection fetch's bare "Failed to fetch",
    and the text box took phrases longer than the server accepts."""
    im = env["images"][0]
    page = _page(browser, env, im["id"])
    detail = [{"type": "too_long", "loc": ["body", "points"], "msg": "List should have at most 64 items"}]
    page.route(f"**/api/images/{im['id']}/decode", lambda route: route.fulfill(
        status=422, content_type="application/json", body=json.dumps({"detail": detail})))
    _click(page)
    page.wait_for_function(f"{STATUS}.startsWith('decode failed')")
    assert page.evaluate(STATUS) == "decode failed: 422: points: List should have at most 64 items"
    page.unroute(f"**/api/images/{im['id']}/decode")
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    page.route(f"**/api/images/{im['id']}/annotations", lambda route: route.abort())
    page.keyboard.press("Enter")
    page.wait_for_function(f"{STATUS}.startsWith('save failed')", timeout=20_000)
    assert "the server did not answer" in page.evaluate(STATUS)
    assert page.evaluate("document.getElementById('text-prompt').maxLength") == 200
    page.close()


def test_a_save_that_lands_after_coming_back_to_its_image_is_shown(browser: Any, env: dict[str, Any]  # noqa: F811
                                                                     ) -> None:
    """Web app audit 4: click, Enter (save held), N, P back, then the save lands: stored, but the list had been
    fetched before it, so the page showed no mask and the annotator would draw the object again."""
    im = env["images"][0]
    page = _page(browser, env, im["id"])
    _click(page)
    page.wait_for_function("window.segany.mask !== null")
    hold = _Hold(method="POST")
    page.route(f"**/api/images/{im['id']}/annotations", hold)
    before = len(_anns(env, im["id"]))
    page.keyboard.press("Enter")
    _until(page, lambda: hold.held, "the save request")
    page.keyboard.press("n")
    page.wait_for_function(f"window.segany.images[window.segany.idx].id !== {im['id']}")
    page.wait_for_function(READY, timeout=60_000)
    page.keyboard.press("p")
    page.wait_for_function(f"window.segany.images[window.segany.idx].id === {im['id']}")
    page.wait_for_function(READY, timeout=60_000)
    shown = page.evaluate("window.segany.saved.length")
    with page.expect_response(f"**/api/images/{im['id']}/annotations?state=accepted,pending"):
        hold.release()
    page.wait_for_function(f"window.segany.saved.length === {shown + 1}", timeout=10_000)
    assert len(_anns(env, im["id"])) == before + 1 and not page.errors
    page.close()


def test_a_review_of_a_mask_someone_else_reviewed_meanwhile_is_refused(browser: Any, env: dict[str, Any]  # noqa: F811
                                                                        ) -> None:
    """Web app audit 4: a reviewer's page still listed a pre-fill that an annotator had accepted since; X then
    rejected it without a word. The page now sends the revision it read, and the 409 refreshes its list."""
    store, im = env["store"], env["images"][2]
    m = np.zeros((im["height"], im["width"]), bool)
    m[10:60, 20:90] = True
    ann = store.save_annotation(im["id"], mask=m, source="semi")[0]
    page = _page(browser, env, im["id"])
    page.wait_for_function(f"window.segany.pending.some((a) => a.id === {ann['id']})")
    store.update_annotation(ann["id"], project_id=env["project"]["id"], review_state="accepted", by=1)  # elsewhere
    page.evaluate(f"window.segany.selectedPending = {ann['id']}")
    with page.expect_request(f"**/api/annotations/{ann['id']}/reject") as req:
        page.keyboard.press("x")
    assert json.loads(req.value.post_data)["revision"] == ann["revision"]
    page.wait_for_function(f"{STATUS}.startsWith('reject failed: 409')")
    assert store.get_annotation(ann["id"])["review_state"] == "accepted"
    page.wait_for_function(f"!window.segany.pending.some((a) => a.id === {ann['id']})")  # the list was fetched again
    assert not page.errors
    page.close()
