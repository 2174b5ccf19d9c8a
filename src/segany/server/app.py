"""FastAPI app factory for the annotation server (data-engine stages 1 and 2).

``create_app(store, model_service)`` returns an app that serves the browser tool from
``segany/server/static`` and a JSON API under ``/api``. Every ``/api`` path except
``/api/health`` needs ``Authorization: Bearer <token>`` of an active annotator
(``segany project add-annotator``), the OpenAPI schema at ``/api/openapi.json`` included (there are
no interactive docs pages: a browser page cannot send the token). The token is checked before the
request body is read, and a body larger than ``--max-upload-mb`` is refused with 413 as soon as it
passes the limit, whether or not it declared a Content-Length. What a user may change depends on
their role (``segany.server.permissions``: annotator, reviewer, admin; refusals are 403). Images are
only ever served by their id in the store, so no request can name a file on disk.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (and the local `Who` alias) at runtime.

import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid as uuid_lib
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segany.engine.masks import encode_mask, normalize_rle
from segany.engine.store import (
    ConflictError,
    InvalidAnnotationError,
    NotFoundError,
    Store,
    file_sha256,
    hash_token,
)
from segany.errors import InputError, SeganyError
from segany.server.model_service import DecodeExpiredError, ModelService
from segany.server.permissions import PermissionDeniedError, require_delete, require_review, require_role
from segany.server.schemas import AnnotationIn, AnnotationPatch, DecodeIn, ProjectPatch, ReviewIn, TextIn

log = logging.getLogger(__name__)

# The database is down, restarting or failing over (or every pooled connection stayed busy for the pool's
# timeout): the client should retry, so 503 and a line saying so instead of a bare 500. The request's transaction
# rolled back, and saves carry a uuid, so a retry never writes twice.
DB_UNAVAILABLE = ("database unavailable; nothing was saved; retry in a few seconds (the server reconnects by "
                  "itself when the database is back)")
_DB_DOWN = (OperationalError, PoolTimeoutError)
DB_DISK_FULL = ("the database's disk is full (or failing); nothing was saved; retrying will not help until an "
                "administrator frees space on the server")


def _db_failure(exc: Exception) -> tuple[int, str, dict[str, str]]:
    """Status, detail and headers for a database error that is not the request's fault. Mostly the database
    is away (503, retry: the server reconnects), but SQLite's full disk or I/O error is an OperationalError too,
    and telling the annotator to retry it would only lose more work (507, no Retry-After)."""
    text = str(exc).lower()
    if "database or disk is full" in text or "disk i/o error" in text:
        return 507, DB_DISK_FULL, {}
    return 503, DB_UNAVAILABLE, {"Retry-After": "5"}

STATIC_DIR = Path(__file__).with_name("static")
PREFILL_NAMESPACE = uuid_lib.UUID("5e6a0000-0000-4000-8000-000000000002")
EXPORT_FORMATS = ("coco", "coco-polygons", "sa1b", "yolo", "png")


# Row ids are SQL BIGINTs: a larger number names no row, and the database driver would fail on it (500)
# instead of answering that nothing is there.
MAX_ROW_ID = 2**63 - 1
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID, description="an image's id in this project")]
AnnotationId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID, description="an annotation's id")]
# Uploads are stored as "<12 hex digits of sha256>-<name>", and file systems allow 255 bytes per name.
UPLOAD_PREFIX_BYTES = 13
MAX_UPLOAD_NAME_BYTES = 255 - UPLOAD_PREFIX_BYTES


@dataclass(frozen=True)
class ServerSettings:
    project: str | None = None  # project name in the store; None = the first project
    max_upload_bytes: int = 32 * 1024 * 1024
    auth_cache_seconds: float = 30.0


class _TokenCache:
    """token hash → annotator for a few seconds, so each request does not cost a database read."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            hit = self._items.get(key)
            if hit and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), value)


# ----------------------------------------------------------------------------------- ASGI guards
# Pure ASGI middleware rather than FastAPI's @app.middleware("http"): the guards must act on the raw
# ``receive`` channel (FastAPI reads and parses the whole body before any dependency such as the token
# check runs), and must answer before the app has read anything.


async def _answer(scope: Scope, send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    """Send a JSON ``{"detail": ...}`` response straight to the ASGI server."""
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit. An HTTPException, so FastAPI's body reading
    (JSON and multipart alike) passes it on unchanged and the app answers 413 with its detail."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes; send less, or start the server "
                              "with a larger --max-upload-mb")


class _LimitBody:
    """413 for a body over ``max_bytes``: at once when Content-Length declares it, and otherwise (chunked
    transfer) as soon as the bytes received pass the limit, before more are buffered or spooled to disk."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _answer(scope, send, 400, f"invalid Content-Length header {length[:40]!r}; send the body's "
                                                "size in bytes, or no Content-Length with chunked transfer")
                return
            if declared > self.max_bytes:
                await _answer(scope, send, 413, _BodyTooLarge(self.max_bytes).detail)
                return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _BodyTooLarge as exc:  # read outside FastAPI's body parsing (none today): answer it here
            if started:
                raise
            await _answer(scope, send, 413, str(exc.detail))


class _RequireToken:
    """401 for an ``/api`` request (other than ``open_paths``) without a valid token, before its body is
    read: a stranger must not make the server buffer or spool anything. The user found is left in
    ``scope["state"]["who"]`` for the routes' ``annotator`` dependency, so a request costs one lookup."""

    def __init__(self, app: ASGIApp, authenticate: Callable[[str], dict[str, Any]],
                 cached: Callable[[str], dict[str, Any] | None], open_paths: frozenset[str]) -> None:
        self.app = app
        self.authenticate = authenticate
        self.cached = cached
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/api" or path.startswith("/api/")) or path in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        who = self.cached(header)
        if who is None:
            try:  # a database read: off the event loop
                who = await run_in_threadpool(self.authenticate, header)
            except HTTPException as exc:
                await _answer(scope, send, exc.status_code, str(exc.detail), dict(exc.headers or {}))
                return
            except _DB_DOWN as exc:  # outside the app's exception handlers: answer as _database_down does
                log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
                await _answer(scope, send, *_db_failure(exc))
                return
        scope.setdefault("state", {})["who"] = who
        await self.app(scope, receive, send)


class _IsolationHeaders:
    """Cross-origin isolation lets onnxruntime-web use threads (SharedArrayBuffer); everything is same-origin."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Cross-Origin-Opener-Policy"] = "same-origin"
                headers["Cross-Origin-Embedder-Policy"] = "require-corp"
            await send(message)

        await self.app(scope, receive, with_headers)


def _unpack_uncompressed_rle(counts: list[int], h: int, w: int) -> np.ndarray:
    flat = np.zeros(h * w, dtype=np.uint8)
    pos, val = 0, 0
    for c in counts:
        if val:
            flat[pos:pos + c] = 1
        pos += c
        val ^= 1
    return flat.reshape(w, h).T  # column-major (COCO order)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool → COCO uncompressed RLE (column-major runs, first run is zeros): easy to decode in JS."""
    flat = np.asarray(mask, dtype=np.uint8).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


class _ProposedMasks:
    """The masks this server's text prompts proposed, as (image, label, mask digest), newest kept.

    Saving one of them as proposed (source "semi", that mask, that label) keeps the model's label even when the
    project does not declare it; any other mask with that label, drawn or edited by hand, goes through the
    declared-label check. A digest of the canonical RLE (the same mask in any RLE form gives the same digest)
    keeps the memory small: at most ``size`` entries of a few hundred bytes each."""

    def __init__(self, size: int = 8192) -> None:
        self._seen: OrderedDict[tuple[int, str, bytes], None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    @staticmethod
    def _digest(rle: dict[str, Any]) -> bytes | None:
        try:
            canonical = normalize_rle(rle)
        except InputError:  # not a mask at all: the store refuses it with the reason after the label check
            return None
        h, w = canonical["size"]
        return hashlib.sha256(f"{h}x{w}:{canonical['counts']}".encode("ascii")).digest()

    def add(self, image_id: int, label: str, rle: dict[str, Any]) -> None:
        digest = self._digest(rle)
        if digest is None:
            return
        key = (image_id, label.strip(), digest)
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def was_proposed(self, image_id: int, label: str | None, rle: dict[str, Any]) -> bool:
        if label is None:
            return False
        digest = self._digest(rle)
        with self._lock:
            return digest is not None and (image_id, label.strip(), digest) in self._seen


# Formats browsers decode themselves (Chromium, Firefox, Safari). Anything else the store accepts (TIFF) is sent
# as PNG made from the pixels the model sees. JPEG's EXIF orientation is applied by browsers as by load_image; an
# orientation tag on another format is rare and browsers differ on it, so such files are converted too.
BROWSER_FORMATS = frozenset({"JPEG", "PNG", "BMP", "WEBP", "GIF"})
EXIF_ORIENTATION = 0x0112


class _BrowserImages:
    """PNG copies of the images a browser cannot show as stored, newest kept up to ``max_bytes``.

    The copy is ``load_image``'s array (EXIF orientation applied, converted to RGB uint8), so the page's pixel
    frame is the one the model embeds and masks are saved in. Keyed by path, modification time and size: a
    replaced file is converted again."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._items: OrderedDict[tuple[str, int, int], bytes | None] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def png_if_needed(self, path: Path) -> bytes | None:
        """None when the file itself can go to the browser; else PNG bytes of the model's view of it."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        png = None if self._browser_decodes(path) else self._to_png(path)
        with self._lock:
            if key not in self._items:
                self._items[key] = png
                self._bytes += len(png or b"")
            while self._bytes > self._max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old or b"")
        return png

    @staticmethod
    def _browser_decodes(path: Path) -> bool:
        from PIL import Image

        try:
            with Image.open(path) as im:
                fmt = im.format
                orientation = im.getexif().get(EXIF_ORIENTATION, 1) if fmt != "JPEG" else 1
        except Exception:  # not opened here (e.g. over the pixel limit): load_image in _to_png says why
            return False
        return fmt in BROWSER_FORMATS and orientation in (0, 1)

    @staticmethod
    def _to_png(path: Path) -> bytes:
        from PIL import Image

        from segany.data.images import load_image

        buf = io.BytesIO()
        Image.fromarray(load_image(path)).save(buf, format="PNG", compress_level=1)  # fast: a local copy
        return buf.getvalue()


def create_app(store: Store, model: ModelService | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app. ``model`` may be None for a store-only server (embedding routes then answer 503)."""
    settings = settings or ServerSettings()
    # No Swagger/ReDoc pages: they load the schema without the token every other /api path needs. The schema
    # itself stays, behind the token (`curl -H "Authorization: Bearer ..." .../api/openapi.json`).
    app = FastAPI(title="segany annotation server", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    project = store.get_project(settings.project)
    project_id = int(project["id"])
    tokens = _TokenCache(settings.auth_cache_seconds)
    state: dict[str, Any] = {"model_version_id": None}
    mv_lock = threading.Lock()
    proposed_masks = _ProposedMasks()
    browser_images = _BrowserImages()
    app.state.store = store
    app.state.model = model
    app.state.project_id = project_id

    # ----------------------------------------------------------------------------------- plumbing
    def bearer(header: str) -> str:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>' (create one with "
                                     "`segany project add-annotator`)", headers={"WWW-Authenticate": "Bearer"})
        return token.strip()

    def cached_user(header: str) -> dict[str, Any] | None:
        """The user of a token seen in the last few seconds (no database read), else None."""
        try:
            return tokens.get(hash_token(bearer(header)))
        except HTTPException:  # no bearer token: authenticate() gives the 401
            return None

    def authenticate(header: str) -> dict[str, Any]:
        """The active user an ``Authorization`` header names; 401 naming the fix otherwise."""
        token = bearer(header)
        key = hash_token(token)
        who = tokens.get(key)
        if who is None:
            who = store.authenticate(token)
            if who is None:
                raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
            tokens.put(key, who)
        return who

    # Added innermost first: the token is checked before the body limit counts a byte, and every answer,
    # refusals included, carries the isolation headers.
    app.add_middleware(_LimitBody, max_bytes=settings.max_upload_bytes)
    app.add_middleware(_RequireToken, authenticate=authenticate, cached=cached_user,
                       open_paths=frozenset({"/api/health"}))
    app.add_middleware(_IsolationHeaders)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each refused value back: a NaN cannot be written as JSON (the refusal
        # became a 500) and a large value would repeat megabytes. Where and why is what the client needs.
        errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ConflictError)
    async def _conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InvalidAnnotationError)
    async def _invalid_annotation(_: Request, exc: InvalidAnnotationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(PermissionDeniedError)
    async def _forbidden(_: Request, exc: PermissionDeniedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
        status, detail, headers = _db_failure(exc)
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(SeganyError)
    async def _bad(_: Request, exc: SeganyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400 if isinstance(exc, InputError) else 500)

    def annotator(request: Request) -> dict[str, Any]:
        who = request.scope.get("state", {}).get("who")  # set by _RequireToken for every /api path
        return who if who is not None else authenticate(request.headers.get("authorization", ""))

    Who = Annotated[dict[str, Any], Depends(annotator)]

    def need_model() -> ModelService:
        if model is None:
            raise HTTPException(503, "this server runs without a model; start it with `segany serve ... --model`")
        return model

    def model_version_id() -> int | None:
        if model is None:
            return None
        with mv_lock:
            if state["model_version_id"] is None:
                state["model_version_id"] = store.register_model_version(
                    model.version_name, model.model_type, model.checkpoint, meta={"device": str(model.device)})
            return state["model_version_id"]

    verified: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (its stat, the sha256 it was checked at)

    def image_for_model(image_id: int) -> dict[str, Any]:
        """The registered image, refused when its file is gone (410) or is not the file registered (409).

        The model sees the file on disk, so a file replaced since it was registered (or an id reused after a
        removal) gave clicks the other picture's masks; `engine auto` refuses such files too. The file is
        hashed again only when its size, mtime or inode changed, so a click costs one stat.
        """
        im = store.get_image(project_id, image_id)
        path = Path(im["path"])
        try:
            st = path.stat()
        except OSError as exc:
            raise HTTPException(410, f"image {image_id} is registered but its file {im['file_name']} is gone; "
                                     "put it back, or remove the image from the project") from exc
        ident = (st.st_mtime_ns, st.st_size, st.st_ino)
        if verified.get(str(path)) != (ident, im["sha256"]):
            if file_sha256(path) != im["sha256"]:
                raise HTTPException(409, f"image {image_id}'s file {im['file_name']} changed since it was "
                                         "registered; put the original back, or register the new file "
                                         "(segany project add-images) and remove this image")
            verified[str(path)] = (ident, im["sha256"])
        return im

    def neighbour(image_id: int, step: int) -> dict[str, Any] | None:
        ids = [im for im in store.list_images(project_id)]
        for i, im in enumerate(ids):
            if im["id"] == image_id and 0 <= i + step < len(ids):
                return ids[i + step]
        return None

    # ------------------------------------------------------------------------------------- routes
    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/me")
    def me(who: Who) -> dict[str, Any]:
        """The signed-in user (id, name, role) and the project; the app hides what the role cannot use."""
        return {"annotator": who, "role": who["role"], "project": store.get_project(settings.project)}

    @app.get("/api/project")
    def get_project(who: Who) -> dict[str, Any]:
        return store.get_project(settings.project)

    @app.patch("/api/project")
    def patch_project(body: ProjectPatch, who: Who) -> dict[str, Any]:
        require_role(who, "admin", "changing the project (stage, labels)")
        return store.update_project(project_id, labels=body.labels, stage=body.stage)

    @app.get("/api/model")
    def model_info(who: Who) -> dict[str, Any]:
        return need_model().info()

    @app.get("/api/model/decoder.onnx")
    def decoder_onnx(who: Who) -> FileResponse:
        path = need_model().onnx_decoder_path()
        return FileResponse(path, media_type="application/octet-stream", filename="decoder.onnx")

    @app.get("/api/model/decoder_image.onnx")
    def decoder_image_onnx(who: Who) -> FileResponse:
        path = need_model().onnx_split_decoder_path("image")
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @app.get("/api/model/decoder_click.onnx")
    def decoder_click_onnx(who: Who) -> FileResponse:
        path = need_model().onnx_split_decoder_path("click")
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @app.get("/api/images")
    def list_images(who: Who) -> list[dict[str, Any]]:
        return [{k: v for k, v in im.items() if k != "path"} for im in store.list_images(project_id)]

    @app.get("/api/images/{image_id}")
    def get_image(image_id: ImageId, who: Who) -> dict[str, Any]:
        im = store.get_image(project_id, image_id)
        im.pop("path")
        return im

    @app.get("/api/images/{image_id}/file")
    def image_file(image_id: ImageId, who: Who) -> Response:
        """The image as stored when browsers can show it, else (TIFF) a PNG of the pixels the model sees."""
        im = store.get_image(project_id, image_id)  # only registered images: ids, never paths
        path = Path(im["path"])
        if not path.is_file():
            raise HTTPException(410, f"image {image_id} is registered but its file {im['file_name']} is gone")
        png = browser_images.png_if_needed(path)
        if png is None:
            return FileResponse(path)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-cache"})

    @app.get("/api/images/{image_id}/embedding")
    def embedding(image_id: ImageId, who: Who, request: Request) -> Response:
        svc = need_model()
        im = image_for_model(image_id)
        # Revalidated on every use, by the model's version and the image's content: with max-age=3600 and a URL
        # naming neither, a browser kept decoding a previous model's embedding for an hour after a restart.
        etag = '"' + hashlib.sha256(f"{svc.version_name}\0{im['sha256']}".encode()).hexdigest()[:32] + '"'
        cache = {"Cache-Control": "private, no-cache", "ETag": etag}
        if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
            return Response(status_code=304, headers=cache)
        nxt = neighbour(image_id, +1)
        t0 = time.perf_counter()
        emb = svc.embedding(image_id, im["path"], prefetch=(nxt["id"], nxt["path"]) if nxt else None)
        arr = emb.features.numpy().astype("<f4", copy=False)
        return Response(arr.tobytes(), media_type="application/octet-stream", headers={
            "X-Embedding-Shape": ",".join(map(str, arr.shape)),
            "X-Original-Size": f"{emb.original_size[0]},{emb.original_size[1]}",
            "X-Input-Size": f"{emb.input_size[0]},{emb.input_size[1]}",
            "X-Compute-Ms": f"{(time.perf_counter() - t0) * 1000:.1f}", **cache,
        })

    @app.post("/api/images/{image_id}/decode")
    def decode(image_id: ImageId, body: DecodeIn, who: Who) -> dict[str, Any]:
        """Three candidate masks for points/box, refined from ``previous`` (an earlier decode's candidate)
        when given, as the browser's decoder refines from the chosen mask. The answer's ``decode_id`` names
        this decode for the next click; a ``previous`` the server no longer keeps answers 410, and the
        client decodes the clicks again (see ``ModelService.remember_decode``)."""
        svc = need_model()
        im = image_for_model(image_id)
        if not body.points and body.box is None:
            raise InputError("decode needs points or a box")
        if len(body.points) != len(body.labels):
            raise InputError(f"got {len(body.points)} points but {len(body.labels)} labels; give one label per point")
        mask_input = None
        if body.previous is not None:
            try:
                mask_input = svc.previous_logits(image_id, body.previous.decode_id, body.previous.index)
            except DecodeExpiredError as exc:
                raise HTTPException(410, str(exc)) from exc
        emb = svc.embedding(image_id, im["path"])
        masks, scores, low_res = svc.decode(emb, points_xy=body.points or None, labels=body.labels or None,
                                            box_xyxy=body.box, mask_input=mask_input)
        return {"masks": [_uncompressed_rle(m) for m in masks], "scores": [float(s) for s in scores],
                "decode_id": svc.remember_decode(image_id, low_res)}

    @app.post("/api/images/{image_id}/text")
    def text_prompt(image_id: ImageId, body: TextIn, who: Who) -> dict[str, Any]:
        """Masks proposed for a phrase ("dog"), best first, for the annotator to accept or reject.

        Nothing is stored: an accepted proposal is saved like any annotation (the app sends source "semi" and
        the phrase in ``prompts``). A model without a text path answers 400 with the model to use instead.
        """
        from segany.text.prompting import check_text_for_model

        svc = need_model()
        im = image_for_model(image_id)
        # A phrase the model cannot take (empty, unknown class, no text path) fails before the image is embedded:
        # seconds of encoder on CPU for an answer of "unknown label".
        check_text_for_model(svc.sam, body.text)
        emb = svc.embedding(image_id, im["path"])
        t0 = time.perf_counter()
        declared = store.get_project(settings.project).get("labels") or []  # a phrase naming one takes its spelling
        label, proposals = svc.text_proposals(emb, body.text, max_masks=body.max_masks, min_score=body.min_score,
                                              labels=declared)
        out = []
        for p in proposals:
            rle = encode_mask(p.mask)
            ys, xs = np.nonzero(p.mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            out.append({"segmentation": rle, "score": p.score, "label": p.label, "area": int(p.mask.sum()),
                        "bbox": bbox})
            proposed_masks.add(image_id, p.label, rle)
        return {"text": body.text.strip(), "label": label, "proposals": out,
                "compute_ms": round((time.perf_counter() - t0) * 1000, 1)}

    @app.get("/api/images/{image_id}/annotations")
    def list_annotations(image_id: ImageId, who: Who, state: str | None = None) -> list[dict[str, Any]]:
        from segany.engine.db import REVIEW_STATES

        store.get_image(project_id, image_id)
        states = state.split(",") if state else None
        unknown = [s for s in states or () if s not in REVIEW_STATES]
        if unknown:  # a typo ("Accepted") would otherwise list nothing, as if the image had no masks
            raise InputError(f"unknown state {unknown[0]!r}: use one or more of {', '.join(REVIEW_STATES)}, "
                             "separated by commas (e.g. ?state=accepted,pending)")
        return store.list_annotations(project_id=project_id, image_id=image_id, states=states)

    @app.post("/api/images/{image_id}/annotations")
    def save_annotation(image_id: ImageId, body: AnnotationIn, who: Who) -> JSONResponse:
        """Store a new mask: 201 with the row; the same uuid again, from the same annotator with the same mask and
        label (a retry after a lost answer), 200 with the row stored the first time.

        A typed label must be one of the project's (422 naming them). A text proposal's label comes from the model
        (its class vocabulary or the phrase) and is accepted as proposed: the app saves it with source "semi" and
        the segmentation the server sent. Only that exact mask skips the check: the word "semi" or an earlier
        proposal of the label on this image is not enough, or any mask could carry any label. The store checks the
        label after the uuid replay, so a retry of a proposal saved before a server restart (which forgot what it
        proposed) is still answered with its row, and a reused uuid is a conflict (409), whatever its label.
        """
        # The image must be this project's before anything else, so another project's image is a 404 first (the
        # store checks it again before answering a replayed uuid: machine uuids are predictable, uuid5 of image,
        # generation and index, and replaying them must never read another project's masks).
        store.get_image(project_id, image_id)
        as_proposed = body.source == "semi" and proposed_masks.was_proposed(
            image_id, body.label, body.segmentation.model_dump())

        def reused() -> ConflictError:
            return ConflictError(f"annotation uuid {body.uuid} already names another annotation; generate a new "
                                 "uuid for each new annotation and send the same one only to retry that save")

        try:
            ann, created = store.save_annotation(
                image_id, rle=body.segmentation.model_dump(), uuid=body.uuid, label=body.label, source=body.source,
                review_state="accepted", model_version_id=model_version_id(), prompts=body.prompts,
                annotator_id=who["id"], seconds_spent=body.seconds_spent, predicted_iou=body.predicted_iou,
                project_id=project_id, declared_label=not as_proposed,
                # A replay answers only the caller's own retry of this save: someone else's annotation (a machine
                # proposal, a colleague's mask) under that uuid, or another mask or label, is a reused key. (Time,
                # prompts and scores are not compared: a client measures the time until each try.)
                same_save=True,
            )
        except ConflictError:
            raise reused() from None  # one wording for every reused uuid, whichever image already holds it
        return JSONResponse(ann, status_code=201 if created else 200)

    @app.patch("/api/annotations/{annotation_id}")
    def patch_annotation(annotation_id: AnnotationId, body: AnnotationPatch, who: Who) -> dict[str, Any]:
        """Edit in place. With ``revision`` an edit of a version someone else has changed since is refused (409);
        with ``edit_uuid`` it is safe to send again: a retry of an edit already applied (its answer lost) is
        answered with the row as that edit left it, as a save's uuid makes a retried save store one mask. The key
        sent with another edit (another label, mask, ...) is refused (409, naming what differs): answering it with
        the first edit's row would drop this one without a word."""
        # ``by``, not ``annotator_id``: the store keeps who drew the mask and records others as its reviewer.
        return store.update_annotation(
            annotation_id, project_id=project_id, rle=body.segmentation.model_dump() if body.segmentation else None,
            label=body.label, review_state=body.review_state, by=who["id"],
            seconds_spent=body.seconds_spent, prompts=body.prompts, expected_revision=body.revision,
            expected_uuid=body.uuid, check=lambda ann: require_review(who, ann, "editing"), declared_label=True,
            edit_uuid=body.edit_uuid)

    @app.delete("/api/annotations/{annotation_id}", status_code=204)
    def delete_annotation(annotation_id: AnnotationId, who: Who, uuid: str | None = None) -> Response:
        """``?uuid=``: answer 409 instead if the id now names another annotation (ids are reused after a delete)."""
        store.delete_annotation(annotation_id, project_id, expected_uuid=uuid,
                                check=lambda ann: require_delete(who, ann))
        return Response(status_code=204)

    @app.post("/api/annotations/{annotation_id}/accept")
    def accept(annotation_id: AnnotationId, body: ReviewIn, who: Who) -> dict[str, Any]:
        """Accept a mask (a pre-fill, a proposal, or a saved one under review). Safe to send again with
        ``edit_uuid``, as an edit is (:func:`reject` says how a retry and a conflict are told apart)."""
        return store.update_annotation(annotation_id, project_id=project_id, review_state="accepted",
                                       by=who["id"], seconds_spent=body.seconds_spent, label=body.label,
                                       expected_uuid=body.uuid, expected_revision=body.revision,
                                       check=lambda ann: require_review(who, ann, "accepting"), declared_label=True,
                                       edit_uuid=body.edit_uuid)

    @app.post("/api/annotations/{annotation_id}/reject")
    def reject(annotation_id: AnnotationId, body: ReviewIn, who: Who) -> dict[str, Any]:
        """Reject a mask. With ``edit_uuid`` (the review's key, a fresh UUID per click) it is safe to send again.

        A retry whose first try was applied but whose answer was lost finds the annotation already reviewed:
        judged as a new request it was a false 409 (the revision it carries has moved on, by its own first try),
        a false 403 (an annotator's rejected proposal is no longer an open proposal they may review), or, without
        a revision, a second application (time counted twice). The key is kept with the revision the review made
        (``annotations.last_edit_uuid``, as for edits), so the same key while that review is still the last change
        is answered 200 with the row as it left it, changing nothing. The replay is decided by the key, not by the
        state (an accept of an accepted mask is not taken as a retry): a review or edit by anyone in between
        replaces the key, so the retry is then judged like any request and a real conflict stays a 409 (stale
        revision) or a 403; the key sent with another action, label or revision is a 409 naming what differs.
        """
        if body.label is not None:  # it was ignored: the client believed it relabelled the mask
            raise InputError("a reject takes no label: a rejected mask keeps its label; to correct the label, "
                             "accept the mask with it or edit the mask")
        return store.update_annotation(annotation_id, project_id=project_id, review_state="rejected",
                                       by=who["id"], seconds_spent=body.seconds_spent,
                                       expected_uuid=body.uuid, expected_revision=body.revision,
                                       check=lambda ann: require_review(who, ann, "rejecting"),
                                       edit_uuid=body.edit_uuid)

    @app.post("/api/images/{image_id}/prefill")
    def prefill(image_id: ImageId, who: Who) -> list[dict[str, Any]]:
        """Stage 2: confident automatic masks, stored as source=semi, review_state=pending, labelled with the
        generator's class label when the model has a class head (else "object").

        Runs once per image and model version; calling again returns what is still pending.
        """
        svc = need_model()
        im = image_for_model(image_id)
        mv = model_version_id()
        done = [a for a in store.list_annotations(project_id=project_id, image_id=image_id, sources=["semi"])
                if a["model_version_id"] == mv]
        if not done:
            from segany.data.images import load_image

            records = svc.prefill(load_image(im["path"]))
            for i, r in enumerate(records):
                key = uuid_lib.uuid5(PREFILL_NAMESPACE, f"{image_id}:{mv}:{i}")
                seg = r["segmentation"]
                rle = encode_mask(seg) if isinstance(seg, np.ndarray) else seg
                prompts = {"point_coords": np.asarray(r.get("point_coords", [])).tolist(),
                           "crop_box": np.asarray(r.get("crop_box", [])).tolist()}
                if "label_score" in r:  # a model with a class head labels its masks (issue 10)
                    prompts["label_score"] = float(r["label_score"])
                store.save_annotation(
                    image_id, rle=rle, uuid=str(key), label=str(r.get("label") or "object"), source="semi",
                    review_state="pending", model_version_id=mv, project_id=project_id, prompts=prompts,
                    predicted_iou=float(r["predicted_iou"]) if "predicted_iou" in r else None,
                    stability_score=float(r["stability_score"]) if "stability_score" in r else None,
                )
        return store.list_annotations(project_id=project_id, image_id=image_id, states=["pending"], sources=["semi"])

    @app.post("/api/images", status_code=201)
    async def upload_image(file: UploadFile, who: Who) -> list[dict[str, Any]]:
        """Add an image to the project by upload (written into the project's media folder); admins only."""
        require_role(who, "admin", "adding images to the project")
        proj = store.get_project(settings.project)
        media = proj["media_dir"] or (str(store.project_dir / "images") if store.project_dir else None)
        if media is None:
            raise InputError("this project has no media folder for uploads; add images with "
                             "`segany project add-images`")
        name = file.filename or ""
        if not name or "/" in name or "\\" in name or name.startswith(".") or ".." in name or "\x00" in name:
            raise HTTPException(400, f"invalid file name {name!r}: send a plain file name without folders")
        if len(os.fsencode(name)) > MAX_UPLOAD_NAME_BYTES:
            raise HTTPException(400, f"file name of {len(os.fsencode(name))} bytes is too long: uploads are stored as "
                                     f"'<hash>-<name>' and the name may have at most {MAX_UPLOAD_NAME_BYTES} bytes "
                                     "(255 per file name on disk); rename the file")
        if Path(name).suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"):
            raise HTTPException(400, f"{name!r} is not a supported image type (jpg, png, bmp, tif, webp)")
        media_dir = Path(media)
        media_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=media_dir, prefix=".upload-", delete=False)
        try:
            with tmp:  # the whole body, this file included, is within --max-upload-mb (_LimitBody)
                while chunk := await file.read(1 << 20):
                    tmp.write(chunk)
            digest = file_sha256(Path(tmp.name))
            dest = media_dir / f"{digest[:12]}-{name}"
            shutil.move(tmp.name, dest)
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
        try:
            added = store.add_images(project_id, [dest])
        except SeganyError:
            dest.unlink(missing_ok=True)
            raise
        if not added and not any(im["path"] == str(dest.resolve()) for im in store.list_images(project_id)):
            dest.unlink(missing_ok=True)  # same pixels already in the project under another name: keep no orphan
        return [{k: v for k, v in im.items() if k != "path"} for im in added]

    @app.get("/api/export/{fmt}")
    def export(fmt: str, who: Who) -> Response:
        from segany.engine import exports

        if fmt not in EXPORT_FORMATS:
            raise HTTPException(404, f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        work = Path(tempfile.mkdtemp(prefix="segany-export-"))
        try:
            if fmt in ("coco", "coco-polygons"):
                out = exports.export_coco(store, project_id, work / "annotations.json",
                                          polygons=fmt == "coco-polygons")
                # The file is streamed after this returns, so the folder goes in a background task.
                cleanup = BackgroundTask(shutil.rmtree, work, ignore_errors=True)
                return FileResponse(out, media_type="application/json", filename=f"{fmt}.json", background=cleanup)
            target = work / fmt
            {"sa1b": exports.export_sa1b, "yolo": exports.export_yolo, "png": exports.export_png}[fmt](
                store, project_id, target)
            # On disk, streamed: a YOLO or SA-1B zip holds every image of the project, and built in memory it
            # cost that much RAM per request.
            archive = work / f"{fmt}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(target.rglob("*")):
                    if f.is_file() and f.name != exports.EXPORT_MARKER:  # the marker guards folders, not downloads
                        zf.write(f, f.relative_to(target))
            shutil.rmtree(target, ignore_errors=True)  # the zip is all that is sent: free the disk now
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # a failed export must not leave its files in /tmp
            raise
        return FileResponse(archive, media_type="application/zip", filename=f"{fmt}.zip",
                            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))

    # ------------------------------------------------------------------------------- browser app
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def unpack_rle_for_tests(rle: dict[str, Any]) -> np.ndarray:
    """Decode the uncompressed RLE the decode route returns (test helper)."""
    h, w = rle["size"]
    return _unpack_uncompressed_rle(rle["counts"], h, w).astype(bool)
