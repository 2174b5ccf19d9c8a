# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""HTTP API of the annotation server: auth, path safety, size limits, embeddings, decoding, saves, stage 2."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
    LABELS,
    SAMPLE_FILES,
    admin_token,
    app,
    auth,
    label_app,
    mask_body,
    model_service,
    project,
    tiny_checkpoint,
    token,
)
from fastapi.testclient import TestClient

from segany.data.images import load_image
from segany.engine.masks import decode_rle
from segany.server.app import _uncompressed_rle, unpack_rle_for_tests


@pytest.fixture
def client(app: Any) -> TestClient:
    return TestClient(app)


# ----------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("method,path", [
    ("GET", "/api/images"), ("GET", "/api/images/1/file"), ("GET", "/api/images/1/embedding"),
    ("POST", "/api/images/1/annotations"), ("DELETE", "/api/annotations/1"), ("GET", "/api/export/coco"),
    ("GET", "/api/model/decoder.onnx"), ("POST", "/api/images/1/prefill"), ("POST", "/api/images/1/text"),
])
def test_no_token_is_401(client: TestClient, token: str, method: str, path: str) -> None:
    r = client.request(method, path)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.request(method, path, headers=auth("not-a-real-token"))
    assert r.status_code == 401


def test_health_and_app_shell_need_no_token(client: TestClient) -> None:
    assert client.get("/api/health").json() == {"ok": True}
    r = client.get("/")
    assert r.status_code == 200 and "segany" in r.text
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("path", [
    "/api/images/..%2F..%2F..%2Fetc%2Fpasswd/file",
    "/api/images/%2E%2E/file",
    "/api/images/1/..%2F..%2Fetc%2Fpasswd",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/%2E%2E/%2E%2E/app.py",
])
def test_path_traversal_refused(client: TestClient, token: str, path: str) -> None:
    r = client.get(path, headers=auth(token))
    assert r.status_code in (404, 422)
    assert b"root:" not in r.content and b"def create_app" not in r.content


def test_unregistered_image_id_is_404(client: TestClient, token: str) -> None:
    assert client.get("/api/images/999/file", headers=auth(token)).status_code == 404


def test_upload_traversal_name_refused(client: TestClient, admin_token: str, project: Any, tmp_path: Any) -> None:
    data = SAMPLE_FILES[2].read_bytes()
    r = client.post("/api/images", headers=auth(admin_token), files={"file": ("../../evil.jpg", data, "image/jpeg")})
    assert r.status_code == 400
    assert not list(tmp_path.rglob("evil.jpg"))


def test_oversized_upload_is_413(client: TestClient, token: str) -> None:
    big = b"\xff" * (3 * 1024 * 1024)  # limit in the fixture is 2 MiB
    r = client.post("/api/images", headers=auth(token), files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413
    r = client.post("/api/images/1/annotations", headers={**auth(token), "Content-Type": "application/json"},
                    content=b"{" + b" " * (3 * 1024 * 1024) + b"}")
    assert r.status_code == 413


def test_upload_adds_image(client: TestClient, token: str, admin_token: str) -> None:
    file = {"file": (SAMPLE_FILES[2].name, SAMPLE_FILES[2].read_bytes(), "image/jpeg")}
    refused = client.post("/api/images", headers=auth(token), files=file)
    assert refused.status_code == 403 and "needs the admin role" in refused.json()["detail"]
    r = client.post("/api/images", headers=auth(admin_token), files=file)
    assert r.status_code == 201, r.text
    assert len(client.get("/api/images", headers=auth(token)).json()) == 3


def test_upload_of_an_image_already_there_leaves_no_file(client: TestClient, admin_token: str, project: Any) -> None:
    """The same pixels under another name are skipped (empty list), and the copy just written is removed; the same
    file uploaded twice keeps the one file the project uses."""
    store, proj = project
    media = Path(store.get_project(proj["name"])["media_dir"])
    before = sorted(media.iterdir()) if media.exists() else []
    data = SAMPLE_FILES[0].read_bytes()
    r = client.post("/api/images", headers=auth(admin_token), files={"file": ("renamed.jpg", data, "image/jpeg")})
    assert r.status_code == 201 and r.json() == []
    assert (sorted(media.iterdir()) if media.exists() else []) == before
    new = {"file": (SAMPLE_FILES[2].name, SAMPLE_FILES[2].read_bytes(), "image/jpeg")}
    first = client.post("/api/images", headers=auth(admin_token), files=new).json()
    again = client.post("/api/images", headers=auth(admin_token), files=new)
    assert again.status_code == 201 and again.json() == []
    assert Path(store.get_image(proj["id"], first[0]["id"])["path"]).is_file()
    assert len(list(media.iterdir())) == len(before) + 1


# ---------------------------------------------------------------------------------------- images
def test_image_listing_and_bytes(client: TestClient, token: str) -> None:
    images = client.get("/api/images", headers=auth(token)).json()
    assert [im["file_name"] for im in images] == [p.name for p in SAMPLE_FILES[:2]]
    assert "path" not in images[0]
    body = client.get(f"/api/images/{images[0]['id']}/file", headers=auth(token)).content
    assert body == SAMPLE_FILES[0].read_bytes()


def test_embedding_lru_and_prefetch(client: TestClient, token: str, model_service: Any) -> None:
    images = client.get("/api/images", headers=auth(token)).json()
    r = client.get(f"/api/images/{images[0]['id']}/embedding", headers=auth(token))
    assert r.status_code == 200
    shape = tuple(int(v) for v in r.headers["x-embedding-shape"].split(","))
    assert shape == (1, 256, 16, 16)
    assert len(r.content) == 4 * int(np.prod(shape))
    h, w = (int(v) for v in r.headers["x-original-size"].split(","))
    assert (h, w) == (images[0]["height"], images[0]["width"])
    deadline = time.monotonic() + 30  # the next image is embedded in the background
    while images[1]["id"] not in model_service.cached_ids():
        assert time.monotonic() < deadline, "next image was not prefetched"
        time.sleep(0.05)
    hits = model_service.stats["hits"]
    client.get(f"/api/images/{images[1]['id']}/embedding", headers=auth(token))
    assert model_service.stats["hits"] == hits + 1


def test_server_decode_matches_predictor(client: TestClient, token: str, model_service: Any) -> None:
    from segany.predictor import SamPredictor

    im = client.get("/api/images", headers=auth(token)).json()[0]
    r = client.post(f"/api/images/{im['id']}/decode", headers=auth(token),
                    json={"points": [[300, 200]], "labels": [1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["masks"]) == 3 and len(out["scores"]) == 3
    pred = SamPredictor(model_service.sam)
    pred.set_image(load_image(SAMPLE_FILES[0]))
    masks, scores, _ = pred.predict(np.array([[300, 200]]), np.array([1]))
    np.testing.assert_allclose(out["scores"], scores, atol=1e-5)
    for k in range(3):
        assert (unpack_rle_for_tests(out["masks"][k]) == masks[k]).mean() > 0.999
    bad = client.post(f"/api/images/{im['id']}/decode", headers=auth(token), json={"points": [[1e6, 5]], "labels": [1]})
    assert bad.status_code == 400 and "outside" in bad.json()["detail"]


def test_second_click_refines_from_the_previous_candidate(client: TestClient, token: str,
                                                          model_service: Any) -> None:
    """Click 2 names click 1's chosen candidate: the server feeds its low-res logits as mask_input, as the
    browser's decoder does, so the masks are SamPredictor's with that mask_input (and not those without)."""
    from segany.predictor import SamPredictor

    im = client.get("/api/images", headers=auth(token)).json()[0]
    url = f"/api/images/{im['id']}/decode"
    first = client.post(url, headers=auth(token), json={"points": [[300, 200]], "labels": [1]}).json()
    assert isinstance(first["decode_id"], str) and len(first["decode_id"]) <= 16
    pts, labels = [[300, 200], [420, 260]], [1, 0]
    pred = SamPredictor(model_service.sam)
    pred.set_image(load_image(SAMPLE_FILES[0]))
    _, _, low1 = pred.predict(np.array(pts[:1]), np.array(labels[:1]))
    plain, _, _ = pred.predict(np.array(pts), np.array(labels))
    for k in (0, 2):
        # what the server feeds is that candidate's logits (this random model's masks hardly depend on them)
        np.testing.assert_allclose(model_service.previous_logits(im["id"], first["decode_id"], k), low1[k][None],
                                   atol=1e-4)
        want, want_scores, _ = pred.predict(np.array(pts), np.array(labels), mask_input=low1[k][None])
        r = client.post(url, headers=auth(token), json={"points": pts, "labels": labels,
                                                        "previous": {"decode_id": first["decode_id"], "index": k}})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["decode_id"] != first["decode_id"]
        np.testing.assert_allclose(out["scores"], want_scores, atol=1e-4)
        got = np.stack([unpack_rle_for_tests(m) for m in out["masks"]])
        for j in range(3):
            assert (got[j] == want[j]).mean() > 0.999
        assert (got != plain).mean() > 0.01, "the previous mask changed nothing: it was not used"


def test_unknown_or_expired_previous_decode_is_410(client: TestClient, token: str, model_service: Any) -> None:
    images = client.get("/api/images", headers=auth(token)).json()
    url = f"/api/images/{images[0]['id']}/decode"
    click = {"points": [[300, 200], [100, 100]], "labels": [1, 1]}
    r = client.post(url, headers=auth(token), json={**click, "previous": {"decode_id": "nope", "index": 0}})
    assert r.status_code == 410 and "unknown or expired" in r.json()["detail"]
    model_service.decode_cache_size = 2  # the server keeps its last 2 decodes: the first of 3 expires
    ids = [client.post(url, headers=auth(token), json=click).json()["decode_id"] for _ in range(3)]
    r = client.post(url, headers=auth(token), json={**click, "previous": {"decode_id": ids[0], "index": 0}})
    assert r.status_code == 410 and "decode the clicks again" in r.json()["detail"]
    ok = client.post(url, headers=auth(token), json={**click, "previous": {"decode_id": ids[2], "index": 1}})
    assert ok.status_code == 200
    other = client.post(f"/api/images/{images[1]['id']}/decode", headers=auth(token),
                        json={**click, "previous": {"decode_id": ids[2], "index": 1}})
    assert other.status_code == 400 and "belongs to image" in other.json()["detail"]
    bad = client.post(url, headers=auth(token), json={**click, "previous": {"decode_id": ids[2], "index": 3}})
    assert bad.status_code == 400 and "names no candidate" in bad.json()["detail"]
    assert client.post(url, headers=auth(token),
                       json={**click, "previous": {"decode_id": ids[2], "index": -1}}).status_code == 422


def test_onnx_decoder_served_and_matches_server(client: TestClient, token: str, model_service: Any) -> None:
    import onnxruntime as ort

    im = client.get("/api/images", headers=auth(token)).json()[0]
    blob = client.get("/api/model/decoder.onnx", headers=auth(token)).content
    sess = ort.InferenceSession(blob)
    r = client.get(f"/api/images/{im['id']}/embedding", headers=auth(token))
    emb = np.frombuffer(r.content, "<f4").reshape(1, 256, 16, 16)
    info = client.get("/api/model", headers=auth(token)).json()
    scale = info["img_size"] / max(im["height"], im["width"])
    out = sess.run(None, {
        "image_embeddings": emb, "point_coords": np.array([[[300 * scale, 200 * scale], [0, 0]]], np.float32),
        "point_labels": np.array([[1, -1]], np.float32), "mask_input": np.zeros((1, 1, 64, 64), np.float32),
        "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([im["height"], im["width"]], np.float32)})
    server = client.post(f"/api/images/{im['id']}/decode", headers=auth(token),
                         json={"points": [[300, 200]], "labels": [1]}).json()
    np.testing.assert_allclose(out[1][0], server["scores"], atol=1e-4)
    for k in range(3):
        assert ((out[0][0, k] > 0) == unpack_rle_for_tests(server["masks"][k])).mean() > 0.999


# ----------------------------------------------------------------------------------- annotations
def test_save_is_idempotent_and_editable(client: TestClient, token: str, project: Any) -> None:
    store, _ = project
    images = client.get("/api/images", headers=auth(token)).json()
    im = images[0]
    body = mask_body(im["height"], im["width"], seconds_spent=4.5, prompts={"points": [[40, 30]], "labels": [1]})
    r1 = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=body)
    r2 = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=body)
    assert (r1.status_code, r2.status_code) == (201, 200)
    a = r1.json()
    assert r2.json()["id"] == a["id"] and store.count_annotations() == 1
    assert a["source"] == "manual" and a["review_state"] == "accepted" and a["seconds_spent"] == 4.5
    assert a["area"] == 40 * 60 and a["bbox"] == [30.0, 20.0, 60.0, 40.0]
    assert a["model_version_id"] is not None and a["annotator_id"] is not None
    assert decode_rle(a["segmentation"])[25, 35]
    # the same key on another image is a client bug, not a retry
    other = client.post(f"/api/images/{images[1]['id']}/annotations", headers=auth(token),
                        json={**body, "segmentation": _uncompressed_rle(np.ones((images[1]["height"], images[1]["width"]), bool))})
    assert other.status_code == 409
    # edit with optimistic revision check
    p = client.patch(f"/api/annotations/{a['id']}", headers=auth(token), json={"label": "thing", "revision": 1})
    assert p.status_code == 200 and p.json()["revision"] == 2 and p.json()["label"] == "thing"
    stale = client.patch(f"/api/annotations/{a['id']}", headers=auth(token), json={"label": "x", "revision": 1})
    assert stale.status_code == 409
    wrong_size = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=mask_body(10, 10))
    assert wrong_size.status_code == 400
    assert client.delete(f"/api/annotations/{a['id']}", headers=auth(token)).status_code == 204
    assert store.count_annotations() == 0
    assert client.delete(f"/api/annotations/{a['id']}", headers=auth(token)).status_code == 404


def test_stale_id_refused_by_uuid(client: TestClient, token: str, project: Any) -> None:
    """SQLite gives a deleted row's id to the next one: a tab still showing the deleted annotation names it by
    id and uuid, and the server refuses (409) to delete or review the new one; the id alone still works."""
    store, _ = project
    im = client.get("/api/images", headers=auth(token)).json()[0]
    url = f"/api/images/{im['id']}/annotations"
    old = client.post(url, headers=auth(token), json=mask_body(im["height"], im["width"])).json()
    assert client.delete(f"/api/annotations/{old['id']}?uuid={old['uuid']}", headers=auth(token)).status_code == 204
    new = client.post(url, headers=auth(token), json=mask_body(im["height"], im["width"])).json()
    assert new["id"] == old["id"] and new["uuid"] != old["uuid"]  # the id is reused
    gone = client.delete(f"/api/annotations/{old['id']}?uuid={old['uuid']}", headers=auth(token))
    assert gone.status_code == 409 and "deleted or replaced" in gone.json()["detail"]
    for action in ("accept", "reject"):
        r = client.post(f"/api/annotations/{old['id']}/{action}", headers=auth(token), json={"uuid": old["uuid"]})
        assert r.status_code == 409
    r = client.patch(f"/api/annotations/{old['id']}", headers=auth(token), json={"label": "x", "uuid": old["uuid"]})
    assert r.status_code == 409
    assert [(a["uuid"], a["review_state"], a["label"]) for a in store.list_annotations()] == [
        (new["uuid"], "accepted", "person")]
    ok = client.post(f"/api/annotations/{new['id']}/reject", headers=auth(token), json={"uuid": new["uuid"]})
    assert ok.status_code == 200
    assert client.delete(f"/api/annotations/{new['id']}", headers=auth(token)).status_code == 204  # no uuid: as before
    assert store.count_annotations() == 0


def test_stage2_prefill_pending_then_accept_reject(client: TestClient, token: str, project: Any) -> None:
    store, _ = project
    im = client.get("/api/images", headers=auth(token)).json()[0]
    pending = client.post(f"/api/images/{im['id']}/prefill", headers=auth(token)).json()
    assert len(pending) == 2
    assert all(a["source"] == "semi" and a["review_state"] == "pending" and a["annotator_id"] is None for a in pending)
    again = client.post(f"/api/images/{im['id']}/prefill", headers=auth(token)).json()
    assert [a["id"] for a in again] == [a["id"] for a in pending]  # runs once per image and model
    ok = client.post(f"/api/annotations/{pending[0]['id']}/accept", headers=auth(token), json={"seconds_spent": 1.5})
    assert ok.json()["review_state"] == "accepted" and ok.json()["annotator_id"] is not None
    no = client.post(f"/api/annotations/{pending[1]['id']}/reject", headers=auth(token), json={})
    assert no.json()["review_state"] == "rejected"
    left = client.post(f"/api/images/{im['id']}/prefill", headers=auth(token)).json()
    assert left == []
    assert {a["review_state"] for a in store.list_annotations()} == {"accepted", "rejected"}
    coco = client.get("/api/export/coco", headers=auth(token)).json()
    assert len(coco["annotations"]) == 1  # rejected proposals stay out of exports


@pytest.mark.parametrize("fmt", ["sa1b", "yolo", "png"])
def test_zip_exports(client: TestClient, token: str, fmt: str) -> None:
    import zipfile

    im = client.get("/api/images", headers=auth(token)).json()[0]
    client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=mask_body(im["height"], im["width"]))
    r = client.get(f"/api/export/{fmt}", headers=auth(token))
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert names and not [n for n in names if n.endswith(".segany-export")]  # the folder marker stays out
    assert client.get("/api/export/nope", headers=auth(token)).status_code == 404


def test_zip_exports_are_built_on_disk_not_in_memory(client: TestClient, token: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A YOLO or SA-1B zip holds every image of the project; built in a BytesIO it cost that much RAM a request."""
    import zipfile
    from pathlib import Path

    targets: list[Any] = []
    real = zipfile.ZipFile

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
            targets.append(file)
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", Recording)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=mask_body(im["height"], im["width"]))
    r = client.get("/api/export/yolo", headers=auth(token))
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('filename="yolo.zip"')
    assert targets and all(isinstance(t, (str, Path)) for t in targets), targets
    monkeypatch.setattr(zipfile, "ZipFile", real)
    assert zipfile.ZipFile(io.BytesIO(r.content)).namelist()


def test_exports_leave_no_temporary_files(client: TestClient, token: str, tmp_path: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each export works in a temporary folder; a server exporting all day must not fill the disk with them."""
    import tempfile

    from segany.engine import exports

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    im = client.get("/api/images", headers=auth(token)).json()[0]
    client.post(f"/api/images/{im['id']}/annotations", headers=auth(token), json=mask_body(im["height"], im["width"]))
    for fmt in ("coco", "yolo"):
        assert client.get(f"/api/export/{fmt}", headers=auth(token)).status_code == 200
        assert list(scratch.iterdir()) == [], fmt

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(exports, "export_yolo", broken)
    with pytest.raises(OSError, match="disk full"):
        client.get("/api/export/yolo", headers=auth(token))
    assert list(scratch.iterdir()) == []


def test_split_decoder_served(client: TestClient, token: str) -> None:
    import onnxruntime as ort

    im = client.get("/api/images", headers=auth(token)).json()[0]
    image_sess = ort.InferenceSession(client.get("/api/model/decoder_image.onnx", headers=auth(token)).content)
    click_sess = ort.InferenceSession(client.get("/api/model/decoder_click.onnx", headers=auth(token)).content)
    emb = np.frombuffer(client.get(f"/api/images/{im['id']}/embedding", headers=auth(token)).content, "<f4")
    names = [o.name for o in image_sess.get_outputs()]
    outs = image_sess.run(names, {"image_embeddings": emb.reshape(1, 256, 16, 16).copy()})
    image_side = dict(zip(names, outs, strict=True))
    iou, low = click_sess.run(None, {**image_side,
                                     "point_coords": np.array([[[100.0, 80.0], [0, 0]]], np.float32),
                                     "point_labels": np.array([[1.0, -1.0]], np.float32),
                                     "mask_input": np.zeros((1, 1, 64, 64), np.float32),
                                     "has_mask_input": np.zeros(1, np.float32)})
    assert iou.shape == (1, 3) and low.shape == (1, 3, 64, 64) and np.isfinite(low).all()
    assert client.get("/api/model/decoder_click.onnx").status_code == 401


# ------------------------------------------------------------------------------------- text prompts
def test_text_prompt_proposes_masks(label_app: Any, token: str) -> None:
    from pycocotools import mask as mask_utils

    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    r = client.post(f"/api/images/{im['id']}/text", headers=auth(token), json={"text": "  the Dogs ", "max_masks": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "the Dogs" and body["label"] == "dog"
    props = body["proposals"]
    assert 1 <= len(props) <= 5
    scores = [p["score"] for p in props]
    assert scores == sorted(scores, reverse=True) and all(0.25 <= s <= 1 for s in scores)
    for p in props:
        m = mask_utils.decode({"size": p["segmentation"]["size"], "counts": p["segmentation"]["counts"].encode()})
        assert m.shape == (im["height"], im["width"]) and m.sum() == p["area"] > 0
        x, y, w, h = p["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert p["label"] == "dog"
    # nothing is stored until the annotator accepts a proposal
    assert client.get(f"/api/images/{im['id']}/annotations", headers=auth(token)).json() == []
    # a stricter threshold than any score: no proposals, still 200
    r = client.post(f"/api/images/{im['id']}/text", headers=auth(token), json={"text": "dog", "min_score": 0.95})
    assert r.status_code == 200 and r.json()["proposals"] == []


@pytest.mark.parametrize("text,fragment", [
    ("", "text is empty"),
    ("   ", "text is empty"),
    ("zebra", f"Known: {', '.join(LABELS)}"),
])
def test_text_prompt_bad_phrase_is_400(label_app: Any, token: str, text: str, fragment: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from segany.server.model_service import ModelService

    embedded: list[int] = []
    monkeypatch.setattr(ModelService, "embedding", lambda self, image_id, *a, **k: embedded.append(image_id))
    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    r = client.post(f"/api/images/{im['id']}/text", headers=auth(token), json={"text": text})
    assert r.status_code == 400 and fragment in r.json()["detail"]
    assert embedded == [], "the image was embedded (seconds of encoder on CPU) for a phrase refused anyway"


def test_text_prompt_without_text_path_names_the_model(client: TestClient, token: str) -> None:
    im = client.get("/api/images", headers=auth(token)).json()[0]
    r = client.post(f"/api/images/{im['id']}/text", headers=auth(token), json={"text": "dog"})
    assert r.status_code == 400
    assert "segany_tiny_labels" in r.json()["detail"]


def test_model_info_says_whether_text_prompts_work(client: TestClient, label_app: Any, token: str) -> None:
    assert client.get("/api/model", headers=auth(token)).json()["text"] is False
    assert TestClient(label_app).get("/api/model", headers=auth(token)).json()["text"] is True


def test_text_prompt_request_validation(label_app: Any, token: str) -> None:
    client = TestClient(label_app)
    im = client.get("/api/images", headers=auth(token)).json()[0]
    for body in ({"text": "dog", "max_masks": 0}, {"text": "dog", "min_score": 2}, {"text": "x" * 201}, {},
                 {"text": "\u0000person"}):
        assert client.post(f"/api/images/{im['id']}/text", headers=auth(token), json=body).status_code == 422
    assert client.post("/api/images/999/text", headers=auth(token), json={"text": "dog"}).status_code == 404


def test_prefill_keeps_the_generators_labels(project: Any, token: str, tiny_checkpoint: Any, tmp_path: Any) -> None:
    """A class-head model's automatic masks carry label and label_score: stage 2 stores them (else "object")."""
    from segany.server.app import ServerSettings, create_app
    from segany.server.model_service import ModelService

    def labelled(image: np.ndarray) -> list[dict[str, Any]]:
        m = np.zeros(image.shape[:2], bool)
        m[10:50, 20:80] = True
        return [{"segmentation": m, "predicted_iou": 0.95, "label": "dog", "label_score": 0.8},
                {"segmentation": ~m, "predicted_iou": 0.93}]

    svc = ModelService("vit_b", str(tiny_checkpoint), device="cpu", cache_dir=tmp_path / "onnx", prefill=labelled)
    client = TestClient(create_app(project[0], svc, ServerSettings()))
    im = client.get("/api/images", headers=auth(token)).json()[0]
    pending = client.post(f"/api/images/{im['id']}/prefill", headers=auth(token)).json()
    assert sorted((a["label"], a["prompts"].get("label_score")) for a in pending) == [("dog", 0.8), ("object", None)]


def test_unknown_state_filter_and_a_label_on_reject_are_refused(client: TestClient, token: str) -> None:
    im = client.get("/api/images", headers=auth(token)).json()[0]
    saved = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token),
                        json=mask_body(im["height"], im["width"])).json()
    url = f"/api/images/{im['id']}/annotations"
    for bad in ("bogus", "Accepted", "accepted,rejectd"):  # listed nothing before, as if the image had no masks
        r = client.get(url, params={"state": bad}, headers=auth(token))
        assert r.status_code == 400 and "use one or more of accepted, pending, rejected" in r.json()["detail"], bad
    assert [a["id"] for a in client.get(url, params={"state": "accepted,pending"}, headers=auth(token)).json()] == \
        [saved["id"]]

    # The label was ignored, so the client believed it had relabelled the mask.
    r = client.post(f"/api/annotations/{saved['id']}/reject", headers=auth(token), json={"label": "thing"})
    assert r.status_code == 400 and "a reject takes no label" in r.json()["detail"]
    assert client.get(url, headers=auth(token)).json()[0]["review_state"] == saved["review_state"]
    r = client.post(f"/api/annotations/{saved['id']}/reject", headers=auth(token), json={})
    assert r.status_code == 200 and r.json()["review_state"] == "rejected" and r.json()["label"] == saved["label"]
