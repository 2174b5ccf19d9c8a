# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""HTTP-layer findings of the third server audit, one test (or table) per finding.

Body limits without Content-Length and the token check before the body; the decode's point cap and ragged
points; a saved uuid replayed from another project or by another user; NaN and Infinity in JSON bodies; ids
past a 64-bit integer; over-long upload names; the OpenAPI schema behind the token.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_fixtures import (  # noqa: F401  (fixtures)
    SAMPLE_FILES,
    admin_token,
    app,
    auth,
    mask_body,
    model_service,
    project,
    tiny_checkpoint,
    token,
)
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel

from segany.engine.auto import machine_uuid
from segany.errors import InputError
from segany.server.app import MAX_UPLOAD_NAME_BYTES
from segany.server.schemas import MAX_DECODE_POINTS, Body

LIMIT = 2 * 1024 * 1024  # the fixtures' ServerSettings(max_upload_bytes=...)
CHUNK = 256 * 1024
CHUNKS = 40  # 10 MiB offered in all: five times the limit


@pytest.fixture
def client(app: Any) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def chunked_post(app: Any, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, str, int]:
    """POST ``chunks`` straight through ASGI as a chunked body (no Content-Length), as uvicorn delivers one.

    TestClient reads a streamed body whole before the app sees it, so it cannot show how much the app read.
    Returns (status, response text, how many chunks the app asked for).
    """
    read = 0
    status = 0
    body = bytearray()

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        + [(b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status, body.decode(errors="replace"), read


def _json_chunks() -> list[bytes]:
    head = b'{"uuid": "%s", "segmentation": {"size": [1, 1], "counts": [0, 1]}, "prompts": {"pad": "' % (
        str(uuid.uuid4()).encode())
    return [head] + [b"a" * CHUNK] * (CHUNKS - 2) + [b'"}}']


def _upload_chunks(name: str = "big.png") -> list[bytes]:
    head = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
            b"Content-Type: image/png\r\n\r\n" % name.encode())
    return [head] + [b"\0" * CHUNK] * (CHUNKS - 2) + [b"\r\n--XX--\r\n"]


# ------------------------------------------------------------------- 1: body limit without Content-Length
def test_chunked_json_over_the_limit_is_413_as_it_arrives(app: Any, token: str, project: Any) -> None:
    status, text, read = chunked_post(app, "/api/images/1/annotations",
                                      {**auth(token), "Content-Type": "application/json"}, _json_chunks())
    assert status == 413, text
    assert "--max-upload-mb" in json.loads(text)["detail"]
    assert read <= LIMIT // CHUNK + 2, f"the app read {read} of {CHUNKS} chunks before refusing"
    assert project[0].count_annotations() == 0


def test_chunked_upload_over_the_limit_is_413_and_leaves_no_file(app: Any, admin_token: str,
                                                                  project: Any) -> None:
    store, proj = project
    media = Path(store.get_project(proj["name"])["media_dir"])
    before = sorted(media.iterdir()) if media.exists() else []
    status, text, read = chunked_post(app, "/api/images", {
        **auth(admin_token), "Content-Type": "multipart/form-data; boundary=XX"}, _upload_chunks())
    assert status == 413, text
    assert read <= LIMIT // CHUNK + 2, f"the app read {read} of {CHUNKS} chunks before refusing"
    assert (sorted(media.iterdir()) if media.exists() else []) == before


@pytest.mark.parametrize("path,content_type,chunks", [
    ("/api/images/1/annotations", "application/json", _json_chunks),
    ("/api/images", "multipart/form-data; boundary=XX", _upload_chunks),
])
@pytest.mark.parametrize("who", ["none", "bad"])
def test_no_valid_token_is_401_before_any_body_is_read(app: Any, token: str, path: str, content_type: str,
                                                       chunks: Any, who: str) -> None:
    headers = {"Content-Type": content_type, **(auth("not-a-real-token") if who == "bad" else {})}
    status, text, read = chunked_post(app, path, headers, chunks())
    assert status == 401, text
    assert read == 0, f"the app read {read} chunks of a stranger's body"


# --------------------------------------------------------------------------- 4 and 8: decode inputs
def test_decode_takes_at_most_the_point_cap(client: TestClient, token: str, model_service: Any) -> None:
    im = client.get("/api/images", headers=auth(token)).json()[0]
    url = f"/api/images/{im['id']}/decode"
    pts = [[10.0 + i, 20.0 + i] for i in range(MAX_DECODE_POINTS + 1)]
    r = client.post(url, headers=auth(token), json={"points": pts, "labels": [1] * len(pts)})
    assert r.status_code == 422, r.text
    assert f"at most {MAX_DECODE_POINTS} points" in r.text and str(len(pts)) in r.text
    ok = client.post(url, headers=auth(token), json={"points": pts[:-1], "labels": [1] * (len(pts) - 1)})
    assert ok.status_code == 200, ok.text
    with pytest.raises(InputError, match=f"at most {MAX_DECODE_POINTS} points"):  # callers other than the API
        model_service.decode(None, points_xy=pts, labels=[1] * len(pts))


@pytest.mark.parametrize("body,fragment", [
    ({"points": [[100, 100], [5]], "labels": [1, 1]}, "points[1] must be [x, y]"),
    ({"points": [[100, 100, 3]], "labels": [1]}, "points[0] must be [x, y]"),
    ({"points": [100, 100], "labels": [1]}, "points[0] must be [x, y]"),
    ({"points": [[100, 100]], "labels": [2**70]}, "labels"),
    ({"box": [1, 2]}, "box must be [x0, y0, x1, y1]"),
])
def test_malformed_decode_prompts_are_422(client: TestClient, token: str, body: dict[str, Any],
                                          fragment: str) -> None:
    r = client.post("/api/images/1/decode", headers=auth(token), json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.text


def test_model_service_names_ragged_points(model_service: Any) -> None:
    with pytest.raises(InputError, match=r"points must be \[\[x, y\], ...\]"):
        model_service.decode(None, points_xy=[[100, 100], [5]], labels=[1, 1])


# ------------------------------------------------------------------------------ 5: uuid replay leaks
def test_replay_of_another_projects_uuid_reveals_nothing(client: TestClient, token: str, project: Any) -> None:
    store, proj = project
    other = store.create_project("other")
    their = store.add_images(other["id"], SAMPLE_FILES[2:3])[0]
    m = np.zeros((their["height"], their["width"]), bool)
    m[10:50, 10:50] = True
    key = machine_uuid(their["id"], 0, 0)  # predictable, as stage 3's keys are
    secret, _ = store.save_annotation(their["id"], mask=m, uuid=key, source="auto", project_id=other["id"])
    tiny = {"uuid": key, "segmentation": {"size": [1, 1], "counts": [0, 1]}, "label": "person"}
    r = client.post(f"/api/images/{their['id']}/annotations", headers=auth(token), json=tiny)
    assert r.status_code == 404, r.text
    ours = client.get("/api/images", headers=auth(token)).json()[0]
    r = client.post(f"/api/images/{ours['id']}/annotations", headers=auth(token),
                    json={**mask_body(ours["height"], ours["width"]), "uuid": key})
    assert r.status_code == 409, r.text
    assert "segmentation" not in r.text and str(secret["segmentation"]["counts"]) not in r.text
    assert f"image {their['id']}" not in r.text  # not even which image of the other project holds it
    assert store.count_annotations(proj["id"]) == 0


def test_replay_answers_only_the_callers_own_save(client: TestClient, token: str, project: Any) -> None:
    store, _ = project
    bob = store.add_annotator("bob")
    im = client.get("/api/images", headers=auth(token)).json()[0]
    body = mask_body(im["height"], im["width"])
    url = f"/api/images/{im['id']}/annotations"
    assert client.post(url, headers=auth(token), json=body).status_code == 201
    assert client.post(url, headers=auth(token), json=body).status_code == 200  # alice's retry
    assert client.post(url, headers=auth(bob), json=body).status_code == 409  # not bob's save
    m = np.zeros((im["height"], im["width"]), bool)
    m[5:25, 5:25] = True
    proposal, _ = store.save_annotation(im["id"], mask=m, uuid=machine_uuid(im["id"], 0, 1), source="auto")
    r = client.post(url, headers=auth(token), json={**body, "uuid": proposal["uuid"]})
    assert r.status_code == 409 and "segmentation" not in r.text


# --------------------------------------------------------------------------------- 7: NaN and Infinity
@pytest.mark.parametrize("extra,where", [
    ('"predicted_iou": NaN', "predicted_iou"),
    ('"predicted_iou": -Infinity', "predicted_iou"),
    ('"prompts": {"points": [[1, 2], [3, Infinity]]}', "prompts.points[1][1]"),
    ('"prompts": {"score": 1e999}', "prompts.score"),  # too large for a float: Python reads it as inf
])
def test_non_finite_numbers_are_422_and_nothing_is_stored(client: TestClient, token: str, project: Any,
                                                           extra: str, where: str) -> None:
    im = client.get("/api/images", headers=auth(token)).json()[0]
    body = json.dumps(mask_body(im["height"], im["width"]))[:-1] + ", " + extra + "}"
    r = client.post(f"/api/images/{im['id']}/annotations", content=body,
                    headers={**auth(token), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert where in r.text and "not a finite number" in r.text
    assert project[0].count_annotations() == 0


def test_non_finite_numbers_in_an_edit_or_decode_are_422(client: TestClient, token: str, project: Any) -> None:
    im = client.get("/api/images", headers=auth(token)).json()[0]
    saved = client.post(f"/api/images/{im['id']}/annotations", headers=auth(token),
                        json=mask_body(im["height"], im["width"])).json()
    json_h = {**auth(token), "Content-Type": "application/json"}
    r = client.patch(f"/api/annotations/{saved['id']}", headers=json_h, content='{"prompts": {"x": NaN}}')
    assert r.status_code == 422, r.text
    assert project[0].get_annotation(saved["id"])["revision"] == saved["revision"]
    r = client.post(f"/api/images/{im['id']}/decode", headers=json_h, content='{"points": [[NaN, 1]], "labels": [1]}')
    assert r.status_code == 422, r.text


def test_every_json_body_refuses_non_finite_numbers(app: Any) -> None:
    """A new route's body model must derive from schemas.Body, or NaN could reach the store again."""
    models = [p.field_info.annotation for r in app.routes if isinstance(r, APIRoute) for p in r.dependant.body_params]
    pydantic_models = [m for m in models if isinstance(m, type) and issubclass(m, BaseModel)]
    assert pydantic_models, "no JSON body routes found"
    assert [m.__name__ for m in pydantic_models if not issubclass(m, Body)] == []


# ------------------------------------------------------------------------------ 9: ids past 64 bits
@pytest.mark.parametrize("method,path", [
    ("GET", "/api/images/9223372036854775808"),
    ("GET", "/api/images/99999999999999999999999/file"),
    ("GET", "/api/images/9223372036854775808/annotations"),
    ("PATCH", "/api/annotations/9223372036854775808"),
    ("DELETE", "/api/annotations/9223372036854775808"),
    ("POST", "/api/annotations/9223372036854775808/accept"),
])
def test_ids_past_64_bits_are_refused_not_500(client: TestClient, token: str, method: str, path: str) -> None:
    r = client.request(method, path, headers=auth(token), json={"label": "person"} if method != "GET" else None)
    assert r.status_code in (404, 422), r.text
    assert client.get("/api/images/9223372036854775807", headers=auth(token)).status_code == 404


# ------------------------------------------------------------------------------ 10: long upload names
def test_upload_name_too_long_is_400_naming_the_limit(client: TestClient, admin_token: str, project: Any) -> None:
    store, proj = project
    media = Path(store.get_project(proj["name"])["media_dir"])
    before = sorted(media.iterdir()) if media.exists() else []
    name = "a" * 300 + ".jpg"
    r = client.post("/api/images", headers=auth(admin_token),
                    files={"file": (name, SAMPLE_FILES[2].read_bytes(), "image/jpeg")})
    assert r.status_code == 400, r.text
    assert f"at most {MAX_UPLOAD_NAME_BYTES} bytes" in r.json()["detail"]
    assert (sorted(media.iterdir()) if media.exists() else []) == before
    fits = "b" * (MAX_UPLOAD_NAME_BYTES - 4) + ".jpg"
    r = client.post("/api/images", headers=auth(admin_token),
                    files={"file": (fits, SAMPLE_FILES[2].read_bytes(), "image/jpeg")})
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------------------- 13: schema and docs
def test_openapi_needs_the_token_and_no_docs_pages(client: TestClient, token: str) -> None:
    for path in ("/api/openapi.json", "/api/docs", "/api/redoc"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    schema = client.get("/api/openapi.json", headers=auth(token))
    assert schema.status_code == 200 and "/api/images/{image_id}/decode" in schema.json()["paths"]
    for path in ("/api/docs", "/docs", "/redoc"):
        assert client.get(path, headers=auth(token)).status_code == 404, path
    assert client.get("/api/health").status_code == 200
