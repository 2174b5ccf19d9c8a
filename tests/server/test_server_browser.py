# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""The annotation app in real Chromium (Debian's package, driven by Playwright): click → mask → save →
reload → in the database; a stage-2 pre-fill appears and is accepted; a phrase typed in the text box gives
proposals, one is accepted and stored with its phrase. Keeps a screenshot.

Chromium is the system one (/usr/bin/chromium); Playwright's own browser download is never used.
The click→mask latency measured in the page (in-browser ONNX decoder, after the embedding arrived)
is printed and written to latency.json; speed is reported, not asserted. Test runs write the screenshot and
latency.json into pytest's tmp_path; SEGANY_UPDATE_DOCS=1 writes them into docs/screenshots/ instead (the
screenshot as app_test_model.png: docs/screenshots/app.png comes from bench/app_latency.py with segany_tiny).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
    REPO,
    admin_token,
    app,
    label_app,
    model_service,
    project,
    running_server,
    tiny_checkpoint,
    token,
)

CHROMIUM = os.environ.get("SEGANY_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VENDORED = REPO / "src" / "segany" / "server" / "static" / "vendor" / "ort" / "ort-wasm-simd-threaded.wasm"

pytestmark = pytest.mark.browser


def _out_dir(tmp_path: Path) -> Path:
    """Where a run keeps its screenshot and latency.json: docs/screenshots only when asked (SEGANY_UPDATE_DOCS=1)."""
    out = REPO / "docs" / "screenshots" if os.environ.get("SEGANY_UPDATE_DOCS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser() -> Any:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("Chromium not found: apt-get install chromium (the browser tests use the system browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def _open(browser: Any, base: str, tok: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("console", lambda m: print(f"[browser {m.type}] {m.text}") if m.type in ("error", "warning") else None)
    page.goto(f"{base}/#token={tok}")
    page.wait_for_function("document.getElementById('status').dataset.ready === '1' && document.body.dataset.decoder",
                           timeout=60_000)
    return page


def _click_image(page: Any, fx: float, fy: float) -> None:
    box = page.locator("#view").bounding_box()
    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)


def test_click_mask_save_reload(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                tmp_path: Path) -> None:
    if not VENDORED.exists():
        pytest.fail("onnxruntime-web is not vendored: run scripts/build_web.sh (needs npm)")
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        assert page.evaluate("document.body.dataset.decoder") == "onnx", "in-browser decoder did not load"
        _click_image(page, 0.5, 0.5)
        page.wait_for_function("window.segany.mask !== null && window.segany.candidates.length === 3")
        # Warm-up done by the first click; measure a few more clicks (each adds a point and decodes).
        page.wait_for_function("window.segany.decodeMs.length === 1")
        for n, (fx, fy) in enumerate(((0.45, 0.55), (0.55, 0.45), (0.6, 0.6), (0.4, 0.4), (0.52, 0.48)), start=2):
            _click_image(page, fx, fy)  # one at a time: a click during a decode would wait for it
            page.wait_for_function(f"window.segany.decodeMs.length === {n}")
        ms = page.evaluate("window.segany.decodeMs")
        parts = page.evaluate("window.segany.timings")
        assert page.evaluate("window.segany.mask.reduce((a, b) => a + b, 0)") > 0
        page.keyboard.press("2")
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        page.wait_for_selector("#annotations li")
        anns = store.list_annotations(project_id=proj["id"])
        assert len(anns) == 1 and anns[0]["source"] == "manual" and anns[0]["seconds_spent"] > 0
        assert anns[0]["prompts"]["points"] and len(anns[0]["prompts"]["points"]) == 6
        page.reload()
        page.wait_for_function("document.getElementById('status').dataset.ready === '1'")
        page.wait_for_selector("#annotations li")
        assert page.locator("#annotations li").count() == 1
        # server fallback decodes the same way when ONNX is unavailable
        page.evaluate("window.segany.session = null")
        _click_image(page, 0.3, 0.3)
        page.wait_for_function("window.segany.candidates.length === 3")
        page.keyboard.press("Escape")
        steady = sorted(ms[1:])
        record = {"click_to_mask_ms_first": round(ms[0], 2), "click_to_mask_ms_median": round(steady[len(steady) // 2], 2),
                  "clicks": [round(x, 2) for x in ms],
                  "last_click_parts_ms": {k: round(v, 2) for k, v in parts.items()}, "model": "tiny test model (decoder full size, 16x16 embedding)",
                  "image": "640x426"}
        print("click->mask latency:", record)
        out = _out_dir(tmp_path)
        (out / "latency.json").write_text(json.dumps(record, indent=1) + "\n")
        page.close()


def test_prefill_appears_and_is_accepted(browser: Any, app: Any, project: Any, token: str,  # noqa: F811
                                        tmp_path: Path) -> None:
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        page.keyboard.press("f")
        # while a pre-fill runs its button is off and says so (checked right after a click: no race)
        busy = page.evaluate("(() => { const b = document.getElementById('prefill'); b.click(); "
                             "return [b.disabled, b.textContent]; })()")
        assert busy == [True, "Pre-filling…"]
        page.wait_for_selector("#pending li", timeout=60_000)
        assert page.locator("#pending li").count() == 2
        page.wait_for_function("!document.getElementById('prefill').disabled")
        assert page.locator("#prefill").inner_text() == "Pre-fill"
        page.locator("#pending li .accept-pending").first.click()
        page.wait_for_function("document.querySelectorAll('#pending li').length === 1")
        page.keyboard.press("x")
        page.wait_for_function("document.querySelectorAll('#pending li').length === 0")
        states = sorted((a["source"], a["review_state"]) for a in store.list_annotations(project_id=proj["id"]))
        assert states == [("semi", "accepted"), ("semi", "rejected")]
        # one manual mask too, then keep a screenshot of the app with both kinds visible
        _click_image(page, 0.5, 0.5)
        page.wait_for_function("window.segany.mask !== null")
        out = _out_dir(tmp_path)
        page.screenshot(path=str(out / ("app.png" if out == tmp_path else "app_test_model.png")))
        page.close()


def test_text_prompt_proposals_accepted(browser: Any, label_app: Any, project: Any, token: str) -> None:  # noqa: F811
    store, proj = project
    with running_server(label_app) as base:
        page = _open(browser, base, token)
        page.keyboard.press("t")  # focus the text box from the keyboard
        assert page.evaluate("document.activeElement.id") == "text-prompt"
        page.keyboard.type("dogs")
        page.keyboard.press("Enter")
        page.wait_for_selector("#pending li.proposal", timeout=60_000)
        n = page.locator("#pending li.proposal").count()
        assert n >= 1
        assert "dog" in page.locator("#pending li.proposal .name").first.inner_text()
        assert store.list_annotations(project_id=proj["id"]) == []  # proposals are not stored until accepted
        area = page.evaluate("window.segany.pending.find((a) => a._proposal).area")
        page.locator("#pending li.proposal .accept-pending").first.click()
        page.wait_for_function(f"document.querySelectorAll('#pending li.proposal').length === {n - 1}")
        page.wait_for_selector("#annotations li")
        anns = store.list_annotations(project_id=proj["id"])
        assert len(anns) == 1
        a = anns[0]
        assert (a["source"], a["label"], a["review_state"]) == ("semi", "dog", "accepted")
        assert a["prompts"]["text"] == "dogs" and a["prompts"]["label_score"] > 0.25
        assert a["area"] == area
        # ask again with the button, reject everything from the keyboard: dropped, nothing more is stored
        page.locator("#text-prompt").fill("a dog")
        page.locator("#text-submit").click()
        page.wait_for_selector("#pending li.proposal", timeout=60_000)
        left = page.locator("#pending li.proposal").count()
        assert left >= 1
        for k in range(left):
            page.keyboard.press("x")
            page.wait_for_function(f"document.querySelectorAll('#pending li.proposal').length === {left - k - 1}")
        assert len(store.list_annotations(project_id=proj["id"])) == 1
        page.close()


def _wait_ready(page: Any) -> None:
    page.wait_for_function("document.getElementById('status').dataset.ready === '1'", timeout=60_000)


def test_late_prefill_is_not_shown_on_the_next_image(browser: Any, app: Any, project: Any,  # noqa: F811
                                                     token: str) -> None:
    """F then N at once: the first image's pre-fill arrives on the second image and must be dropped there."""
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        first = page.evaluate("window.segany.images[0].id")
        page.keyboard.press("f")
        page.keyboard.press("n")
        _wait_ready(page)
        assert page.evaluate("window.segany.idx") == 1
        # the pre-fill of image 1 is stored (server side), and its answer has reached the page by now
        deadline = time.monotonic() + 30
        while len(store.list_annotations(project_id=proj["id"], image_id=first, states=["pending"])) < 2:
            assert time.monotonic() < deadline, "pre-fill never ran"
            time.sleep(0.1)
        page.wait_for_timeout(1000)
        assert page.evaluate("window.segany.pending.length") == 0
        assert page.locator("#pending li").count() == 0
        page.keyboard.press("y")  # nothing pending here: nothing of image 1 gets accepted
        page.wait_for_timeout(300)
        assert all(a["review_state"] == "pending" for a in store.list_annotations(project_id=proj["id"]))
        page.close()


def _saved_box(store: Any, project_id: int, image_id: int, label: str = "person") -> dict[str, Any]:
    im = store.get_image(project_id, image_id)
    h, w = im["height"], im["width"]
    m = np.zeros((h, w), bool)
    m[20:80, 30:120] = True
    return store.save_annotation(image_id, mask=m, label=label)[0]


def test_delete_needs_a_selection_and_a_confirmation(browser: Any, app: Any, project: Any,  # noqa: F811
                                                    admin_token: str) -> None:
    store, proj = project
    image_id = store.list_images(proj["id"])[0]["id"]
    ann = _saved_box(store, proj["id"], image_id)  # nobody's (as if imported): deleting it needs a reviewer+
    with running_server(app) as base:
        page = _open(browser, base, admin_token)
        assert page.locator("#annotations li").count() == 1
        dialogs: list[str] = []
        answer = {"ok": False}
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept() if answer["ok"] else d.dismiss()))
        page.keyboard.press("Delete")  # nothing selected: nothing deleted
        page.keyboard.press("Backspace")
        page.wait_for_timeout(300)
        assert [a["id"] for a in store.list_annotations(project_id=proj["id"])] == [ann["id"]] and not dialogs
        page.locator("#annotations li .name").click()  # select it; Delete asks, "Cancel" keeps it
        page.keyboard.press("Delete")
        page.locator("#annotations li button.delete").click()  # the ✕ asks too
        page.wait_for_timeout(300)
        assert len(dialogs) == 2 and "Delete annotation" in dialogs[0]
        assert len(store.list_annotations(project_id=proj["id"])) == 1
        answer["ok"] = True
        page.keyboard.press("Delete")
        page.wait_for_function("document.querySelectorAll('#annotations li').length === 0")
        assert store.list_annotations(project_id=proj["id"]) == []
        page.close()


def test_stale_delete_is_refused_and_said(browser: Any, app: Any, project: Any,  # noqa: F811
                                          admin_token: str) -> None:
    """The page shows annotation A; meanwhile A is deleted and B gets its id: deleting A leaves B alone."""
    store, proj = project
    image_id = store.list_images(proj["id"])[0]["id"]
    old = _saved_box(store, proj["id"], image_id)
    with running_server(app) as base:
        page = _open(browser, base, admin_token)
        store.delete_annotation(old["id"])
        new = _saved_box(store, proj["id"], image_id, label="thing")
        assert new["id"] == old["id"]
        page.on("dialog", lambda d: d.accept())
        page.locator("#annotations li .name").click()
        page.keyboard.press("Delete")
        page.wait_for_function("document.getElementById('status').textContent.includes('deleted or replaced')")
        assert [a["uuid"] for a in store.list_annotations(project_id=proj["id"])] == [new["uuid"]]
        # the list is fetched again: A is gone, B (now holding that id) is shown
        page.wait_for_function("document.querySelector('#annotations li .name')?.textContent.startsWith('thing')")
        assert page.locator("#annotations li").count() == 1
        page.close()


def _mask_px(page: Any) -> int:
    return int(page.evaluate("window.segany.mask ? window.segany.mask.reduce((a, b) => a + b, 0) : 0"))


def test_unsaved_mask_survives_navigation_and_sign_in(browser: Any, app: Any, project: Any,  # noqa: F811
                                                      token: str) -> None:
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.type), d.dismiss()))
        _click_image(page, 0.5, 0.5)
        page.wait_for_function("window.segany.mask !== null")
        px = _mask_px(page)
        page.keyboard.press("n")  # asks; "Cancel" stays on the image with the mask
        page.wait_for_timeout(200)
        assert dialogs == ["confirm"] and page.evaluate("window.segany.idx") == 0 and _mask_px(page) == px
        page.evaluate("window.segany.token = 'expired'")  # the session ends: saving asks to sign in again
        page.keyboard.press("Enter")
        page.wait_for_selector("#login:not([hidden])")
        page.locator("#token").fill(token)
        page.locator("#login button[type=submit]").click()
        page.wait_for_selector("#login", state="hidden")
        assert _mask_px(page) == px  # still there, and it saves
        page.keyboard.press("Enter")
        page.wait_for_selector("#annotations li")
        assert len(store.list_annotations(project_id=proj["id"])) == 1
        _click_image(page, 0.3, 0.3)
        page.wait_for_function("window.segany.mask !== null")
        leave = "(() => { const e = new Event('beforeunload', {cancelable: true}); window.dispatchEvent(e); return e.defaultPrevented; })()"
        assert page.evaluate(leave)  # leaving the page with an unsaved mask asks too (the browser's own dialog)
        page.keyboard.press("Escape")
        assert not page.evaluate(leave)
        page.close()


def test_pending_rows_show_the_label_accept_applies(browser: Any, app: Any, project: Any,  # noqa: F811
                                                     token: str) -> None:
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        page.keyboard.press("f")
        page.wait_for_selector("#pending li", timeout=60_000)
        rows = page.locator("#pending li")
        assert "person" in rows.first.inner_text()  # the project's first label, in the label box by default
        assert "person" in rows.first.locator(".accept-pending").get_attribute("title")
        page.locator("#label").fill("thing")
        assert "thing" in rows.first.inner_text() and "person" not in rows.first.inner_text()
        rows.first.locator(".accept-pending").click()
        page.wait_for_selector("#annotations li")
        assert [a["label"] for a in store.list_annotations(project_id=proj["id"], states=["accepted"])] == ["thing"]
        page.close()


def test_keyboard_sign_in_buttons_and_redo(browser: Any, app: Any, project: Any, token: str) -> None:  # noqa: F811
    store, proj = project
    with running_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(base)  # no token yet: the sign-in box opens with its field focused, and Enter signs in
        page.wait_for_selector("#login:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "token"
        page.keyboard.type(token)
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('status').dataset.ready === '1' && document.body.dataset.decoder",
                               timeout=60_000)
        for n, (fx, fy) in enumerate(((0.5, 0.5), (0.3, 0.6)), start=1):
            _click_image(page, fx, fy)
            page.wait_for_function(f"window.segany.decodeMs.length === {n}")
        npts = "window.segany.points.length"
        page.keyboard.press("Control+z")
        assert page.evaluate(npts) == 1
        page.keyboard.press("Control+Shift+z")
        assert page.evaluate(npts) == 2
        page.keyboard.press("Control+z")
        page.keyboard.press("Control+y")
        assert page.evaluate(npts) == 2
        page.focus("#clear")  # Enter on a focused button presses that button, it does not also accept the mask
        page.keyboard.press("Enter")
        assert page.evaluate(npts) == 0 and page.evaluate("window.segany.mask") is None
        page.focus("#mode-brush")
        page.keyboard.press(" ")
        assert page.evaluate("window.segany.mode") == "brush"
        page.wait_for_timeout(300)
        assert store.list_annotations(project_id=proj["id"]) == []
        page.close()


def test_text_box_off_without_text_model_and_errors_fit_one_line(browser: Any, app: Any,  # noqa: F811
                                                                 token: str) -> None:
    with running_server(app) as base:
        page = _open(browser, base, token)
        assert page.locator("#text-prompt").is_disabled() and page.locator("#text-submit").is_disabled()
        assert "cannot segment from text" in page.locator("#text-form").get_attribute("title")
        # a server error (here: the text route asked anyway) is one line in the status bar, all of it in the tooltip
        page.evaluate("document.getElementById('text-prompt').value = 'dog';"
                      "document.getElementById('text-form').requestSubmit()")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('text prompt failed')")
        status = page.locator("#status")
        text, title = status.inner_text(), status.get_attribute("title")
        assert "\n" not in text and len(text) <= 140 and len(title) > len(text)
        assert page.evaluate("document.getElementById('status').getBoundingClientRect().height") < 30
        page.close()


def test_pending_colours_match_rows_and_narrow_layout(browser: Any, app: Any, token: str) -> None:  # noqa: F811
    with running_server(app) as base:
        page = _open(browser, base, token)
        page.keyboard.press("f")
        page.wait_for_function("document.querySelectorAll('#pending li').length === 2", timeout=60_000)
        swatches = page.evaluate("[...document.querySelectorAll('#pending li .swatch')]"
                                 ".map((e) => getComputedStyle(e).backgroundColor.match(/\\d+/g).map(Number))")
        # the colour each pending mask is painted with on the image, at a pixel of that mask alone
        painted = page.evaluate("""(() => { const S = window.segany, ctx = S.overlay.getContext('2d');
            return S.pending.map((a) => {
              const i = a._mask.findIndex((v, j) => v && S.pending.every((o) => o === a || !o._mask[j]));
              return [...ctx.getImageData(i % S.W, Math.floor(i / S.W), 1, 1).data.slice(0, 3)]; }); })()""")
        assert len({tuple(c) for c in swatches}) == 2
        for got, want in zip(painted, swatches, strict=True):  # (canvas alpha rounding: a unit or two off)
            assert max(abs(x - y) for x, y in zip(got, want, strict=True)) <= 3, (painted, swatches)
        page.set_viewport_size({"width": 600, "height": 900})  # narrow: the side panel goes below the image
        stage, aside = (page.locator(sel).bounding_box() for sel in ("#stage", "aside"))
        assert aside["y"] >= stage["y"] + stage["height"] - 1 and aside["width"] > 500
        page.close()



def _decoder_steps(page: Any) -> list[tuple[str, list[float] | None]]:
    """Three clicks (the third a background click), an undo and another click. After each click: the shown mask
    (as a '0'/'1' string) and the chosen candidate's low-res logits (in-browser decoder only; None on the server)."""
    steps = []
    n = 0
    for fx, fy, button in ((0.5, 0.5, "left"), (0.35, 0.6, "left"), (0.65, 0.35, "right"), (0.45, 0.3, "left")):
        if n == 3:
            page.keyboard.press("Control+z")  # back to two clicks: the next one refines from click 2's mask again
        box = page.locator("#view").bounding_box()
        page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy, button=button)
        n += 1
        page.wait_for_function(f"window.segany.decodeMs.length === {n}", timeout=60_000)
        steps.append(tuple(page.evaluate("[window.segany.mask.join(''), window.segany.lowres instanceof "
                                         "Float32Array ? Array.from(window.segany.lowres) : null]")))
    return steps


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def test_server_decoder_gives_the_browser_decoders_masks(browser: Any, app: Any, project: Any,  # noqa: F811
                                                         model_service: Any, token: str) -> None:  # noqa: F811
    """The server fallback (forced here by failing the ONNX files) refines later clicks from the chosen mask as
    the in-browser decoder does, so the same clicks give the same masks in both modes."""
    import torch

    if not VENDORED.exists():
        pytest.fail("onnxruntime-web is not vendored: run scripts/build_web.sh (needs npm)")
    with running_server(app) as base:
        page = _open(browser, base, token)
        assert page.evaluate("document.body.dataset.decoder") == "onnx"
        in_browser = _decoder_steps(page)
        page.close()
        # The server keeps one decode: after the undo, click 2's decode is gone (410) and the page decodes
        # clicks 1 and 2 again before click 4, which must not change the mask.
        model_service.decode_cache_size = 1
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        gone: list[str] = []
        page.on("response", lambda r: gone.append(r.url) if r.status == 410 else None)
        page.route("**/api/model/decoder_*.onnx", lambda route: route.abort())
        page.goto(f"{base}/#token={token}")
        page.wait_for_function("document.getElementById('status').dataset.ready === '1' && "
                               "document.body.dataset.decoder", timeout=60_000)
        assert page.evaluate("document.body.dataset.decoder") == "server"
        on_server = _decoder_steps(page)
        page.close()
    assert len(gone) == 2, gone  # click 2's decode, then click 1's, made again
    store, proj = project
    im = store.list_images(proj["id"])[0]
    emb = model_service.embedding(im["id"], im["path"])
    h, w = emb.original_size

    def bits(s: str) -> np.ndarray:
        return (np.frombuffer(s.encode(), np.uint8) == ord("1")).reshape(h, w)

    shown, exact = [], []
    for (b_mask, b_low), (s_mask, _) in zip(in_browser, on_server, strict=True):
        server = bits(s_mask)
        # The browser's chosen logits, resized the server's way: isolates the prompt path from the page's
        # one-pass upscale, which must equal the server's two resizes (its one-bilinear predecessor cost ~0.02 IoU).
        side = int(len(b_low) ** 0.5)
        low = torch.tensor(b_low, dtype=torch.float32).reshape(1, 1, side, side)
        b_exact = model_service.sam.postprocess_masks(low, emb.input_size, emb.original_size)[0, 0].numpy() > 0
        exact.append(_iou(b_exact, server))
        shown.append(_iou(bits(b_mask), server))
        assert 0 < server.sum() < server.size
    print("IoU browser vs server decoder per click: shown", [round(v, 4) for v in shown],
          "same upscale", [round(v, 4) for v in exact])
    assert min(exact) > 0.999, exact
    assert min(shown) > 0.999, shown


def test_save_refused_with_a_4xx_is_not_retried(browser: Any, app: Any, project: Any, token: str) -> None:  # noqa: F811
    """A 422 (or 403) says what to fix: one request, its message at once; only network errors and 5xx repeat."""
    with running_server(app) as base:
        page = _open(browser, base, token)
        posts: list[str] = []

        def refuse(route: Any) -> None:
            if route.request.method != "POST":
                route.continue_()
                return
            posts.append(route.request.url)
            route.fulfill(status=422, content_type="application/json", body='{"detail": "label: too long"}')

        page.route("**/api/images/*/annotations", refuse)
        page.evaluate("window.segany.mask = new Uint8Array(window.segany.W * window.segany.H).fill(1)")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('save failed: 422')")
        page.wait_for_timeout(800)  # a retry would have come after 300 ms
        assert len(posts) == 1
        page.close()


def test_a_save_stored_after_all_is_shown_not_refused(browser: Any, app: Any, project: Any, token: str) -> None:  # noqa: F811
    """A save stored but its answer lost, every retry then lost to the network ("save failed"), the label changed
    and Enter again: the same key with another label is a 409 from the server. The page shows the stored
    annotation, selected, instead of the API's wording, and nothing is stored twice."""
    store, proj = project
    with running_server(app) as base:
        page = _open(browser, base, token)
        tries: list[int | None] = []  # the server's status per try; None: the network was down

        def lost(route: Any) -> None:
            if route.request.method != "POST":
                route.continue_()
                return
            if tries:  # after the first try: the network is down
                tries.append(None)
                route.abort()
                return
            tries.append(route.fetch().status)  # stored ...
            route.abort("connectionreset")  # ... and the page never hears back

        page.route("**/api/images/*/annotations", lost)
        page.evaluate("window.segany.mask = new Uint8Array(window.segany.W * window.segany.H).fill(1)")
        page.evaluate("document.getElementById('label').value = 'person'")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('save failed')")
        assert tries == [201, None, None, None], tries
        page.unroute("**/api/images/*/annotations")
        page.evaluate("document.getElementById('label').value = 'thing'")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('not saved again')")
        stored = store.list_annotations(project_id=proj["id"])
        assert len(stored) == 1 and stored[0]["label"] == "person", stored
        status = page.locator("#status").text_content()
        assert f"as annotation {stored[0]['id']} (person)" in status and "E edits it" in status, status
        assert page.evaluate("window.segany.selected") == stored[0]["id"]
        assert page.evaluate("window.segany.mask") is None  # nothing left to save twice
        page.close()


def test_opening_an_image_starts_its_own_prefill(browser: Any, app: Any, project: Any, admin_token: str) -> None:  # noqa: F811
    """Semi stage: the pre-fill of the image left behind is still running; the next image gets its own at once."""
    store, proj = project
    store.update_project(proj["id"], stage="semi")
    images = [im["id"] for im in store.list_images(proj["id"])]
    with running_server(app) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        held: list[Any] = []  # image 1's pre-fill gets no answer until the end: it is still running when N opens image 2
        page.route(f"**/api/images/{images[0]}/prefill", lambda route: held.append(route))
        page.goto(f"{base}/#token={admin_token}")
        page.wait_for_function("document.getElementById('status').dataset.ready === '1' && document.body.dataset.decoder",
                               timeout=60_000)
        page.wait_for_function("document.getElementById('prefill').disabled")
        page.keyboard.press("n")
        _wait_ready(page)
        deadline = time.monotonic() + 60
        while not store.list_annotations(project_id=proj["id"], image_id=images[1], states=["pending"]):
            assert time.monotonic() < deadline, "opening the second image did not pre-fill it"
            time.sleep(0.1)
        page.wait_for_function("document.querySelectorAll('#pending li').length > 0", timeout=60_000)
        assert page.locator("#prefill").text_content() == "Pre-fill" and held
        held[0].abort()
        page.close()


def test_browser_clicks_reach_the_model_where_the_predictor_puts_them(browser: Any, app: Any, token: str) -> None:
    """The page scaled both axes by one factor (img_size / long side) where the predictor scales each by its
    own rounded side, so clicks landed up to half a model pixel off on the short side and the browser's masks
    differed from the server's (0.08 in logits on a 1000x667 photo)."""
    from segany.transforms import ResizeLongestSide

    with running_server(app) as base:
        page = _open(browser, base, token)
        side = page.evaluate("window.segany.model.img_size")
        pts = np.array([[0.0, 0.0], [511.0, 653.0], [827.5, 509.25], [999.0, 666.0], [12.0, 699.0]])
        for h, w in ((667, 1000), (1000, 667), (13, 700), (425, 640)):
            got = page.evaluate("([h, w, pts]) => { window.segany.H = h; window.segany.W = w; "
                                "return pts.map(([x, y]) => window.segany.modelFrame(x, y)); }", [h, w, pts.tolist()])
            want = ResizeLongestSide(side).apply_coords(pts, (h, w))
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-9, err_msg=f"{h}x{w}")
        page.close()


def test_a_proposal_whose_answer_was_lost_is_sent_again_and_stored_once(browser: Any, label_app: Any,
                                                                        project: Any, token: str) -> None:
    """Web app audit 4: each accept of a text proposal made a new uuid, so a save whose answer was lost (stored,
    but the page saw a network error), accepted again, was stored twice. Then it was still sent once, so one lost
    answer said "save failed" of a mask the server had stored: the page now sends it again by itself (as any save,
    with the same uuid) and the server answers the repeat with the row it stored. Accepted again by the user after
    every try failed, it is still stored once."""
    store, proj = project
    with running_server(label_app) as base:
        page = _open(browser, base, token)
        page.locator("#text-prompt").fill("dogs")
        page.locator("#text-submit").click()
        page.wait_for_selector("#pending li.proposal", timeout=60_000)
        n = page.locator("#pending li.proposal").count()
        tries: list[tuple[str, int | None]] = []  # (the save's uuid, the server's status; None: it never got there)
        answers: list[dict] = []
        plan = {"lose": 0, "down": 0}

        def flaky(route: Any) -> None:
            if route.request.method != "POST":
                route.continue_()
                return
            key = route.request.post_data_json["uuid"]
            if plan["down"] and not plan["lose"]:  # the network is down: the server never sees it
                plan["down"] -= 1
                tries.append((key, None))
                route.abort()
                return
            answer = route.fetch()  # the server stores it ...
            tries.append((key, answer.status))
            answers.append(answer.json())
            if plan["lose"]:
                plan["lose"] -= 1
                route.abort("connectionreset")  # ... and the page never hears back
            else:
                route.fulfill(response=answer)

        def accept(**how: int) -> str:
            """Accept the (last) proposal with the network as ``how`` says; the status the save ends with."""
            plan.update(how)
            page.evaluate("document.getElementById('status').textContent = ''")
            page.locator("#pending li.proposal .accept-pending").last.click()
            page.wait_for_function("(t => t.startsWith('saved') || t.startsWith('save failed'))"
                                   "(document.getElementById('status').textContent)")
            return page.locator("#status").text_content()

        page.route("**/api/images/*/annotations", flaky)
        # Stored, its answer lost, then the network down for every retry: "save failed", the proposal back (last
        # in the list) ...
        assert accept(lose=1, down=3).startswith("save failed")
        key = tries[0][0]
        assert tries == [(key, 201)] + [(key, None)] * 3, tries
        page.wait_for_function(f"document.querySelectorAll('#pending li.proposal').length === {n}")
        # ... accepted again by the user, and that answer lost too: the page sends it again by itself and shows it
        # saved; the server answered each repeat with the row it stored the first time, stored once.
        status = accept(lose=1)
        assert status.startswith("saved"), status
        assert tries[4:] == [(key, 200), (key, 200)] and answers[0] == answers[1] == answers[2], (tries, answers)
        assert [a["uuid"] for a in store.list_annotations(project_id=proj["id"])] == [key]
        assert page.locator("#pending li.proposal").count() == n - 1
        page.close()
