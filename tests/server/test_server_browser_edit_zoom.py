# ruff: noqa: F811  (pytest fixtures are imported and used as arguments)
"""Web app audit 5, in real Chromium: editing a saved annotation in place, zoom and pan, and an undo history that
stays small.

* A saved mask is loaded as the current one (E on the selected row, its ✎, a double-click), refined by clicks and
  the brush, relabelled, and saved with PATCH (the revision the edit began from): an edit of a version someone else
  has changed since is refused (409) with a sentence, and the list is fetched again.
* A 40x30 image was shown 40x30 screen pixels: it opens fitted to the stage in crisp pixels, and a click lands on
  the image pixel shown under it after zooming (wheel) and panning (middle-button drag). The test finds each pixel on
  a screenshot by its colour (every pixel of the image has its own), so it checks what the annotator sees.
* Each brush stroke kept a full copy of the mask for undo: the history now holds what the strokes changed, is
  capped, and undo/redo still give every earlier mask back.

* Edit mode with the decoder in the page (onnxruntime-web), whose save survives a lost answer: the page sends the
  same edit again and the server stores it once (the PATCH's edit_uuid), instead of a false 409.

One server and one browser serve the module; pages decode on the server (no onnxruntime-web), as in audit 3, except
the in-browser decoder's test, which comes last.
"""

from __future__ import annotations

import io
import json
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
MASK_PX = "window.segany.mask ? window.segany.mask.reduce((a, b) => a + b, 0) : null"
# The shown mask as (pixels on, a hash of where they are): equal masks, equal values.
MASK_HASH = """(() => { const m = window.segany.mask; if (!m) return null; let n = 0, h = 0;
  for (let i = 0; i < m.length; i++) if (m[i]) { n++; h = (Math.imul(h, 31) + i) | 0; } return [n, h]; })()"""
# The bytes of typed arrays the undo/redo stacks hold (each buffer once), whatever shape their entries have.
HISTORY_BYTES = """(() => { const seen = new Set(); let n = 0;
  const walk = (x, d) => {
    if (x === null || typeof x !== 'object' || d > 8) return;
    if (ArrayBuffer.isView(x)) { if (!seen.has(x.buffer)) { seen.add(x.buffer); n += x.buffer.byteLength; } return; }
    if (seen.has(x)) return; seen.add(x);
    for (const v of Array.isArray(x) ? x : Object.values(x)) walk(v, d + 1);
  };
  walk(window.segany.history, 0); walk(window.segany.future, 0); return n; })()"""


def _colour(i: int, j: int) -> tuple[int, int, int]:
    """The colour of pixel (x=i, y=j) of the 40x30 test image: unique per pixel."""
    return 5 + 6 * i, 5 + 8 * j, 128


def _tiny_png(path: Path) -> Path:
    from PIL import Image

    a = np.zeros((30, 40, 3), np.uint8)
    for j in range(30):
        for i in range(40):
            a[j, i] = _colour(i, j)
    Image.fromarray(a).save(path)
    return path


def _big_jpg(path: Path) -> Path:
    from PIL import Image

    with Image.open(SAMPLE_FILES[1]) as im:
        im.convert("RGB").resize((1200, 900)).save(path, quality=80)
    return path


@pytest.fixture(scope="module")
def env(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
        onnx_cache: Path) -> Iterator[dict[str, Any]]:
    """Two photos, a 40x30 PNG and a 1200x900 JPEG; an annotator's token; the running server."""
    tmp = tmp_path_factory.mktemp("audit5")
    files = [SAMPLE_FILES[0], _tiny_png(tmp / "tiny.png"), _big_jpg(tmp / "big.jpg"), SAMPLE_FILES[1]]
    with served_demo_project(tiny_checkpoint, tmp, files, onnx_cache) as served:
        store, proj = served["store"], served["project"]
        by_name = {Path(im["file_name"]).stem: im for im in store.list_images(proj["id"])}
        token = store.add_annotator("alice")
        yield {**served, "token": token, "alice": store.authenticate(token)["id"],
               "photo": by_name[SAMPLE_FILES[0].stem], "tiny": by_name["tiny"], "big": by_name["big"],
               "photo2": by_name[SAMPLE_FILES[1].stem]}


def _page(browser: Any, env: dict[str, Any], image: dict[str, Any], onnx: bool = False) -> Any:  # noqa: F811
    """A page on ``image``, decoding on the server, or with ``onnx`` in the browser (onnxruntime-web)."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    if not onnx:
        page.route("**/api/model/decoder_*.onnx", lambda route: route.abort())
    page.goto(f"{env['base']}/?image={image['id']}#token={env['token']}")
    page.wait_for_function(READY, timeout=60_000)
    assert page.evaluate("document.body.dataset.decoder") == ("onnx" if onnx else "server")
    return page


def _at(page: Any, image: dict[str, Any], x: float, y: float) -> tuple[float, float]:
    """The client position of image point (x, y) while the image is fitted (the canvas is the whole image then)."""
    if getattr(page, "fitted", None) is None:  # (asked once: the fitted view does not move)
        page.fitted = page.locator("#view").bounding_box()
    box = page.fitted
    return box["x"] + box["width"] * x / image["width"], box["y"] + box["height"] * y / image["height"]


def _stroke(page: Any, image: dict[str, Any], x0: float, y0: float, x1: float, y1: float, erase: bool = False) -> None:
    page.mouse.move(*_at(page, image, x0, y0))
    page.mouse.down(button="right" if erase else "left")
    page.mouse.move(*_at(page, image, x1, y1), steps=3)
    page.mouse.up(button="right" if erase else "left")


def test_a_saved_mask_and_its_label_are_edited_in_place(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    """Select, E, a click adds an object (the saved mask stays in), undo steps back out of the edit and redo into it,
    a brush stroke and a new label are saved with PATCH on the same annotation. Then someone else edits it while
    the page edits it again: Enter is refused with a sentence, the list shows their version, nothing is stored."""
    store, im, pid = env["store"], env["photo"], env["project"]["id"]
    h, w = im["height"], im["width"]
    m = np.zeros((h, w), bool)
    m[100:160, 200:320] = True
    ann = store.save_annotation(im["id"], mask=m, label="person", annotator_id=env["alice"])[0]
    row = f"#annotations li[data-id='{ann['id']}']"
    page = _page(browser, env, im)
    page.locator("#label").fill("thing")  # the label the next new mask would get: kept across the edit
    page.locator(f"{row} .name").click()  # select it, then E
    page.keyboard.press("e")
    page.wait_for_function(f"window.segany.editing && window.segany.editing.id === {ann['id']}", timeout=10_000)
    assert page.evaluate(MASK_PX) == m.sum() and page.locator("#label").input_value() == "person"
    assert page.locator(f"{row}.editing").count() == 1
    inside = "(() => { const S = window.segany; let k = 0; for (let y = 100; y < 160; y++) for (let x = 200; x < 320; x++) k += S.mask[y * S.W + x]; return k; })()"
    page.mouse.click(*_at(page, im, 450, 300))  # a click adds the object it finds to the saved mask
    page.wait_for_function("window.segany.candidates.length === 3")
    assert page.evaluate(inside) == m.sum() and page.evaluate(MASK_PX) >= m.sum()
    page.keyboard.press("Control+z")  # the click taken back: the saved mask again
    assert page.evaluate(MASK_PX) == m.sum() and page.evaluate("window.segany.points.length") == 0
    page.keyboard.press("b")
    _stroke(page, im, 330, 120, 400, 130)  # the brush adds a band right of the box
    stroked = page.evaluate(MASK_HASH)
    assert stroked[0] > m.sum()
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+z")  # past the start of the edit: out of it, the label box as it was
    assert page.evaluate("[window.segany.editing, window.segany.mask]") == [None, None]
    assert page.locator("#label").input_value() == "thing"
    page.keyboard.press("Control+y")
    page.keyboard.press("Control+y")
    assert page.evaluate("window.segany.editing.id") == ann["id"] and page.evaluate(MASK_HASH) == stroked
    page.locator("#label").fill("thing")
    with page.expect_request(f"**/api/annotations/{ann['id']}") as req:
        page.locator("#accept").click()
    assert req.value.method == "PATCH"
    body = json.loads(req.value.post_data)
    assert (body["revision"], body["uuid"], body["label"]) == (ann["revision"], ann["uuid"], "thing")
    page.wait_for_function(f"{STATUS}.startsWith('saved the edit of annotation {ann['id']}')")
    got = store.get_annotation(ann["id"])
    assert (got["label"], got["area"], got["revision"]) == ("thing", stroked[0], ann["revision"] + 1)
    assert [a["id"] for a in store.list_annotations(project_id=pid, image_id=im["id"])] == [ann["id"]]  # no new one
    assert page.evaluate("window.segany.editing") is None and page.locator(f"{row} .name").inner_text().startswith("thing")

    # A stale edit: someone else relabels it while this page edits it again.
    page.locator(f"{row} .edit").click()
    page.wait_for_function(f"window.segany.editing && window.segany.editing.revision === {got['revision']}")
    _stroke(page, im, 150, 200, 180, 210)
    store.update_annotation(ann["id"], project_id=pid, label="person", by=env["alice"])
    page.keyboard.press("Enter")
    page.wait_for_function(f"{STATUS}.startsWith('not saved: someone else changed')")
    assert "409" in page.locator("#status").get_attribute("title")  # the server's words in the tooltip
    page.wait_for_function(f"document.querySelector(\"{row} .name\").textContent.startsWith('person')")  # refreshed
    now = store.get_annotation(ann["id"])
    assert (now["area"], now["revision"]) == (stroked[0], got["revision"] + 1)
    page.keyboard.press("Escape")  # drop the edit; E opens the current version
    page.keyboard.press("e")
    page.wait_for_function(f"window.segany.editing && window.segany.editing.revision === {now['revision']}")
    assert page.locator("#label").input_value() == "person" and not page.errors
    page.close()


def _shot(page: Any) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)


def _block(shot: np.ndarray, i: int, j: int) -> tuple[int, int, int, int, int]:
    """Where image pixel (i, j) is on screen: its box (x0, y0, x1, y1) and how many screen pixels show it."""
    ys, xs = np.nonzero(np.all(shot == _colour(i, j), axis=-1))
    assert len(xs), f"pixel ({i}, {j}) is not on the screen"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), len(xs)


def _click_pixel(page: Any, shot: np.ndarray, i: int, j: int) -> list[float]:
    """Click the middle of pixel (i, j) as the screen shows it; the image point the page put there."""
    x0, y0, x1, y1, _ = _block(shot, i, j)
    n = page.evaluate("window.segany.decodeMs.length")
    page.mouse.click((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2)
    page.wait_for_function(f"window.segany.decodeMs.length === {n + 1}")
    p = page.evaluate("[window.segany.points.at(-1).x, window.segany.points.at(-1).y]")
    page.keyboard.press("Escape")
    return p


def test_a_tiny_image_is_fitted_crisp_and_clicks_land_on_their_pixel(browser: Any, env: dict[str, Any]  # noqa: F811
                                                                       ) -> None:
    im = env["tiny"]
    page = _page(browser, env, im)
    stage = page.locator("#stage").bounding_box()
    fitted = page.locator("#view").bounding_box()
    # fitted: the image fills the stage's width or height (a 40x30 picture at 40x30 was unusable)
    assert max(fitted["width"] / stage["width"], fitted["height"] / stage["height"]) > 0.98, (fitted, stage)
    zoom = fitted["width"] / im["width"]
    shot = _shot(page)
    x0, y0, x1, y1, n = _block(shot, 7, 12)
    # crisp: the pixel is one solid block of its own colour, zoom screen pixels wide (smoothing would blend it)
    assert n == (x1 - x0 + 1) * (y1 - y0 + 1) and abs((x1 - x0 + 1) - zoom) <= 1.5, (n, x0, y0, x1, y1, zoom)
    for i, j in ((7, 12), (0, 0), (39, 29)):
        p = _click_pixel(page, shot, i, j)
        assert [int(p[0]), int(p[1])] == [i, j], p
    # zoom in with the wheel at pixel (30, 20): it stays under the pointer, bigger
    bx0, by0, bx1, by1, _ = _block(shot, 30, 20)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    page.mouse.move(cx, cy)
    level = page.locator("#zoom-level").inner_text()
    page.mouse.wheel(0, -200)
    page.wait_for_function(f"document.getElementById('zoom-level').textContent !== {level!r}")
    shot = _shot(page)
    zx0, zy0, zx1, zy1, _ = _block(shot, 30, 20)
    assert zx0 <= cx <= zx1 and zy0 <= cy <= zy1 and zx1 - zx0 > 1.3 * (bx1 - bx0)
    p = _click_pixel(page, shot, 33, 22)
    assert [int(p[0]), int(p[1])] == [33, 22], p
    # pan with the middle button: what is at the stage's centre now is another pixel, and a click lands on it
    centre = (int(stage["x"] + stage["width"] / 2), int(stage["y"] + stage["height"] / 2))
    before = tuple(shot[centre[1], centre[0]])
    page.mouse.move(*centre)
    page.mouse.down(button="middle")
    page.mouse.move(centre[0] + 230, centre[1] + 140, steps=4)
    page.mouse.up(button="middle")
    shot = _shot(page)
    r, g, _ = shot[centre[1], centre[0]]
    i, j = (r - 5) // 6, (g - 5) // 8
    assert _colour(i, j)[:2] == (r, g) and (r, g) != before[:2]
    p = _click_pixel(page, shot, i, j)
    assert [int(p[0]), int(p[1])] == [i, j], p
    # the brush at one pixel's radius paints the pixel under the pointer, and only it
    page.keyboard.press("b")
    for _ in range(5):
        page.keyboard.press("[")
    x0, y0, x1, y1, _ = _block(shot, i + 1, j)
    page.mouse.click((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2)
    assert page.evaluate(f"[{MASK_PX}, window.segany.mask[{j * im['width'] + i + 1}]]") == [1, 1]
    page.keyboard.press("0")  # fit again
    again = page.locator("#view").bounding_box()
    assert all(abs(again[k] - fitted[k]) < 0.5 for k in ("x", "y", "width", "height")) and not page.errors
    page.close()


# In-page strokes and keys (mouse and keyboard events dispatched as the browser does for real ones, one round trip
# for many): 40 strokes through Playwright's mouse took 7 s, each event waiting for a frame.
_HASH_FN = f"const hash = () => {MASK_HASH};"
STROKES = "([strokes, box, W, H]) => { " + _HASH_FN + """
  const cv = document.getElementById('view');
  const at = (x, y) => ({ clientX: box.x + box.width * x / W, clientY: box.y + box.height * y / H, bubbles: true });
  return strokes.map(([x0, y0, x1, y1, erase]) => {
    const button = erase ? 2 : 0, buttons = erase ? 2 : 1;
    cv.dispatchEvent(new MouseEvent('mousedown', { ...at(x0, y0), button, buttons }));
    for (let k = 1; k <= 4; k++)
      cv.dispatchEvent(new MouseEvent('mousemove', { ...at(x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4), buttons }));
    cv.dispatchEvent(new MouseEvent('mouseup', { ...at(x1, y1), button }));
    return hash();
  }); }"""
KEYS = "([key, shift, n]) => { " + _HASH_FN + """
  return Array.from({ length: n }, () => {
    document.body.dispatchEvent(new KeyboardEvent('keydown', { key, ctrlKey: true, shiftKey: shift, bubbles: true }));
    return hash();
  }); }"""


def test_brush_undo_history_is_compact_and_capped(browser: Any, env: dict[str, Any]) -> None:  # noqa: F811
    im = env["big"]
    page = _page(browser, env, im)
    page.keyboard.press("b")
    box, size = page.locator("#view").bounding_box(), (im["width"], im["height"])
    def at(k: int) -> tuple[int, int]:
        return 60 + (k % 8) * 140, 80 + (k // 8) * 160

    # 40 strokes; every fifth one erases across the one before
    strokes = [(x, y, x + 90, y + 40, False) for x, y in map(at, range(40))]
    for k in range(4, 40, 5):
        x, y = at(k - 1)
        strokes[k] = (x + 10, y + 30, x + 80, y - 5, True)
    hashes = page.evaluate(STROKES, [strokes, box, *size])
    assert len({tuple(h) for h in hashes}) == 40  # every stroke changed the mask
    held = page.evaluate(HISTORY_BYTES)
    one_mask = im["width"] * im["height"]
    print(f"undo history after 40 strokes: {held} bytes ({one_mask} per full mask)")
    assert held < one_mask / 4, held  # a full copy per stroke held 40 masks
    # undo gives every earlier mask back, and redo every later one
    assert page.evaluate(KEYS, ["z", False, 40]) == hashes[-2::-1] + [None]
    assert page.evaluate(KEYS, ["y", False, 40]) == hashes
    # the cap: past it the oldest steps go; those kept still undo exactly
    page.evaluate("window.segany.historyMaxBytes = 3000")
    hashes += page.evaluate(STROKES, [[(100 + k * 150, 700, 220 + k * 150, 760, False) for k in range(6)], box, *size])
    assert page.evaluate("window.segany.historyBytes()") <= 3000
    kept = page.evaluate("window.segany.history.length")
    assert 1 <= kept < 46
    undone = page.evaluate(KEYS, ["z", False, kept + 1])  # one more than kept: nothing older is there
    assert undone == hashes[-2:-2 - kept:-1] + [hashes[-1 - kept]] and not page.errors
    page.close()


def _edit(page: Any, ann: dict[str, Any]) -> None:
    """Open the annotation for editing with its row's ✎."""
    page.locator(f"#annotations li[data-id='{ann['id']}'] .edit").click()
    page.wait_for_function(f"window.segany.editing && window.segany.editing.id === {ann['id']}", timeout=10_000)


def test_an_edit_by_the_in_browser_decoder_is_saved_once_over_a_lost_answer(browser: Any, env: dict[str, Any]  # noqa: F811
                                                                            ) -> None:
    """Edit mode with the ONNX decoder in the page (the other tests decode on the server): a click adds the object
    it finds to the saved mask, a second click refines it from the chosen candidate's logits, undo and redo step
    through the decodes, and Enter saves the mask the page shows, although the server's answer is lost: the page
    sends the same edit again (its edit_uuid) and the server answers with what it stored, once. (It was not sent
    again, and Enter again met its own new revision: a false 'someone else changed it', 409.) The next edit starts
    from the revision stored: a first background click cuts out the object it finds, a brush stroke keeps the cut, a
    click after it starts a new object, and it saves."""
    store, im = env["store"], env["photo2"]
    h, w = im["height"], im["width"]
    m = np.zeros((h, w), bool)
    m[60:140, 80:220] = True
    ann = store.save_annotation(im["id"], mask=m, label="person", annotator_id=env["alice"])[0]
    page = _page(browser, env, im, onnx=True)
    sent: list[dict[str, Any]] = []

    def lose_first_answer(route: Any) -> None:
        sent.append(json.loads(route.request.post_data))
        if len(sent) == 1:
            route.fetch()  # the server applies it...
            route.abort()  # ...and the answer is lost
        else:
            route.continue_()

    page.route(f"**/api/annotations/{ann['id']}", lose_first_answer)
    inside = """(() => { const S = window.segany; let k = 0;
      for (let y = 60; y < 140; y++) for (let x = 80; x < 220; x++) k += S.mask[y * S.W + x]; return k; })()"""
    decoded = "(n) => window.segany.decodeMs.length === n && window.segany.decoding === 0"
    _edit(page, ann)
    hashes = []
    for n, (x, y) in enumerate(((w * 0.6, h * 0.6), (w * 0.65, h * 0.55)), start=1):
        page.mouse.click(*_at(page, im, x, y))
        page.wait_for_function(decoded, arg=n)
        assert page.evaluate("window.segany.candidates.length") == 3
        assert page.evaluate("window.segany.lowres instanceof Float32Array")  # decoded in the page
        assert page.evaluate(inside) == m.sum()  # the saved mask stays in
        hashes.append(page.evaluate(MASK_HASH))
    assert hashes[1][0] > m.sum()  # the object was added
    page.keyboard.press("Control+z")
    assert page.evaluate(MASK_HASH) == hashes[0] and page.evaluate("window.segany.points.length") == 1
    page.keyboard.press("Control+y")
    assert page.evaluate(MASK_HASH) == hashes[1]
    page.keyboard.press("Enter")
    page.wait_for_function(f"{STATUS}.startsWith('saved the edit of annotation {ann['id']}')", timeout=10_000)
    assert len(sent) == 2 and sent[0]["edit_uuid"] and sent[0] == sent[1]  # the same edit, sent again
    got = store.get_annotation(ann["id"])
    assert (got["area"], got["revision"]) == (hashes[1][0], ann["revision"] + 1)  # applied once
    # a first background click inside the mask cuts out the object there
    _edit(page, {**ann, **got})
    page.mouse.click(*_at(page, im, 150, 100), button="right")
    page.wait_for_function(decoded, arg=3)
    cut = page.evaluate(MASK_HASH)
    assert page.evaluate("window.segany.editCut") and cut[0] < hashes[1][0]
    page.keyboard.press("b")
    _stroke(page, im, 30, 400, 60, 410)
    page.keyboard.press("b")
    stroked = page.evaluate(MASK_HASH)
    assert stroked[0] > cut[0] and page.evaluate("[window.segany.points.length, window.segany.editCut]") == [0, False]
    page.mouse.click(*_at(page, im, w * 0.6, h * 0.6))
    page.wait_for_function(decoded, arg=4)
    assert page.evaluate(MASK_HASH)[0] >= stroked[0] and page.evaluate("window.segany.points.length") == 1
    page.keyboard.press("Enter")
    page.wait_for_function(f"{STATUS}.startsWith('saved the edit of annotation {ann['id']}')", timeout=10_000)
    now = store.get_annotation(ann["id"])
    assert len(sent) == 3 and sent[2]["edit_uuid"] != sent[0]["edit_uuid"] and now["revision"] == got["revision"] + 1
    assert now["area"] == page.evaluate(
        f"window.segany.saved.find((a) => a.id === {ann['id']})._mask.reduce((a, b) => a + b, 0)")
    assert not page.errors
    page.close()
