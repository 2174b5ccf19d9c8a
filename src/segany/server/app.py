"""FastAPI app factory for the annotation server (data-engine stages 1 and 2).

``create_app(store, model_service)`` returns an app that serves the browser tool from
``segany/server/static`` and a JSON API under ``/api``. Every ``/api`` route except
``/api/health`` needs ``Authorization: Bearer <token>`` of an active annotator
(``segany project add-annotator``), and what they may change depends on their role
(``segany.server.permissions``: annotator, reviewer, admin; refusals are 403). Images are only ever
served by their id in the store, so no request can name a file on disk.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (and the local `Who` alias) at runtime.

import io
import logging
import shutil
import tempfile
import threading
import time
import uuid as uuid_lib
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from segany.engine.masks import encode_mask
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

STATIC_DIR = Path(__file__).with_name("static")
PREFILL_NAMESPACE = uuid_lib.UUID("5e6a0000-0000-4000-8000-000000000002")
EXPORT_FORMATS = ("coco", "coco-polygons", "sa1b", "yolo", "png")


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


class _ProposedLabels:
    """The (image, label) pairs this server's text prompts proposed, newest kept: saving a proposal keeps the
    model's label even when the project does not declare it, and nothing else may skip the declared-label check."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def add(self, image_id: int, label: str) -> None:
        with self._lock:
            self._seen[(image_id, label)] = None
            self._seen.move_to_end((image_id, label))
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def was_proposed(self, image_id: int, label: str | None) -> bool:
        with self._lock:
            return label is not None and (image_id, label) in self._seen


def create_app(store: Store, model: ModelService | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app. ``model`` may be None for a store-only server (embedding routes then answer 503)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="segany annotation server", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json")
    project = store.get_project(settings.project)
    project_id = int(project["id"])
    tokens = _TokenCache(settings.auth_cache_seconds)
    state: dict[str, Any] = {"model_version_id": None}
    mv_lock = threading.Lock()
    proposed_labels = _ProposedLabels()
    app.state.store = store
    app.state.model = model
    app.state.project_id = project_id

    # ----------------------------------------------------------------------------------- plumbing
    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > settings.max_upload_bytes
            except ValueError:
                return JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)
            if too_big:
                return JSONResponse({"detail": f"request body of {length} bytes exceeds the limit of "
                                               f"{settings.max_upload_bytes} bytes (--max-upload-mb)"},
                                    status_code=413)
        response = await call_next(request)
        # Cross-origin isolation lets onnxruntime-web use threads (SharedArrayBuffer); everything is same-origin.
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        return response

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

    @app.exception_handler(SeganyError)
    async def _bad(_: Request, exc: SeganyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400 if isinstance(exc, InputError) else 500)

    def annotator(request: Request) -> dict[str, Any]:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>' (create one with "
                                     "`segany project add-annotator`)", headers={"WWW-Authenticate": "Bearer"})
        key = hash_token(token.strip())
        who = tokens.get(key)
        if who is None:
            who = store.authenticate(token.strip())
            if who is None:
                raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
            tokens.put(key, who)
        return who

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
    def get_image(image_id: int, who: Who) -> dict[str, Any]:
        im = store.get_image(project_id, image_id)
        im.pop("path")
        return im

    @app.get("/api/images/{image_id}/file")
    def image_file(image_id: int, who: Who) -> FileResponse:
        im = store.get_image(project_id, image_id)  # only registered images: ids, never paths
        path = Path(im["path"])
        if not path.is_file():
            raise HTTPException(410, f"image {image_id} is registered but its file {im['file_name']} is gone")
        return FileResponse(path)

    @app.get("/api/images/{image_id}/embedding")
    def embedding(image_id: int, who: Who) -> Response:
        svc = need_model()
        im = store.get_image(project_id, image_id)
        nxt = neighbour(image_id, +1)
        t0 = time.perf_counter()
        emb = svc.embedding(image_id, im["path"], prefetch=(nxt["id"], nxt["path"]) if nxt else None)
        arr = emb.features.numpy().astype("<f4", copy=False)
        return Response(arr.tobytes(), media_type="application/octet-stream", headers={
            "X-Embedding-Shape": ",".join(map(str, arr.shape)),
            "X-Original-Size": f"{emb.original_size[0]},{emb.original_size[1]}",
            "X-Input-Size": f"{emb.input_size[0]},{emb.input_size[1]}",
            "X-Compute-Ms": f"{(time.perf_counter() - t0) * 1000:.1f}",
            "Cache-Control": "private, max-age=3600",
        })

    @app.post("/api/images/{image_id}/decode")
    def decode(image_id: int, body: DecodeIn, who: Who) -> dict[str, Any]:
        """Three candidate masks for points/box, refined from ``previous`` (an earlier decode's candidate)
        when given, as the browser's decoder refines from the chosen mask. The answer's ``decode_id`` names
        this decode for the next click; a ``previous`` the server no longer keeps answers 410, and the
        client decodes the clicks again (see ``ModelService.remember_decode``)."""
        svc = need_model()
        im = store.get_image(project_id, image_id)
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
    def text_prompt(image_id: int, body: TextIn, who: Who) -> dict[str, Any]:
        """Masks proposed for a phrase ("dog"), best first, for the annotator to accept or reject.

        Nothing is stored: an accepted proposal is saved like any annotation (the app sends source "semi" and
        the phrase in ``prompts``). A model without a text path answers 400 with the model to use instead.
        """
        svc = need_model()
        im = store.get_image(project_id, image_id)
        emb = svc.embedding(image_id, im["path"])
        t0 = time.perf_counter()
        label, proposals = svc.text_proposals(emb, body.text, max_masks=body.max_masks, min_score=body.min_score)
        out = []
        for p in proposals:
            rle = encode_mask(p.mask)
            ys, xs = np.nonzero(p.mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            out.append({"segmentation": rle, "score": p.score, "label": p.label, "area": int(p.mask.sum()),
                        "bbox": bbox})
        if out:
            proposed_labels.add(image_id, label)
        return {"text": body.text.strip(), "label": label, "proposals": out,
                "compute_ms": round((time.perf_counter() - t0) * 1000, 1)}

    @app.get("/api/images/{image_id}/annotations")
    def list_annotations(image_id: int, who: Who, state: str | None = None) -> list[dict[str, Any]]:
        store.get_image(project_id, image_id)
        states = state.split(",") if state else None
        return store.list_annotations(project_id=project_id, image_id=image_id, states=states)

    @app.post("/api/images/{image_id}/annotations")
    def save_annotation(image_id: int, body: AnnotationIn, who: Who) -> JSONResponse:
        # A typed label must be one of the project's (422 naming them). A text proposal's label comes from the
        # model (its class vocabulary or the phrase) and is accepted as proposed; the client's word "semi"
        # alone is not enough, or any label could be saved by claiming to be a proposal.
        if not proposed_labels.was_proposed(image_id, body.label):
            store.check_label(project_id, body.label)
        ann, created = store.save_annotation(
            image_id, rle=body.segmentation.model_dump(), uuid=body.uuid, label=body.label, source=body.source,
            review_state="accepted", model_version_id=model_version_id(), prompts=body.prompts,
            annotator_id=who["id"], seconds_spent=body.seconds_spent, predicted_iou=body.predicted_iou,
            project_id=project_id,
        )
        return JSONResponse(ann, status_code=201 if created else 200)

    @app.patch("/api/annotations/{annotation_id}")
    def patch_annotation(annotation_id: int, body: AnnotationPatch, who: Who) -> dict[str, Any]:
        # ``by``, not ``annotator_id``: the store keeps who drew the mask and records others as its reviewer.
        return store.update_annotation(
            annotation_id, project_id=project_id, rle=body.segmentation.model_dump() if body.segmentation else None,
            label=body.label, review_state=body.review_state, by=who["id"],
            seconds_spent=body.seconds_spent, prompts=body.prompts, expected_revision=body.revision,
            expected_uuid=body.uuid, check=lambda ann: require_review(who, ann, "editing"), declared_label=True)

    @app.delete("/api/annotations/{annotation_id}", status_code=204)
    def delete_annotation(annotation_id: int, who: Who, uuid: str | None = None) -> Response:
        """``?uuid=``: answer 409 instead if the id now names another annotation (ids are reused after a delete)."""
        store.delete_annotation(annotation_id, project_id, expected_uuid=uuid,
                                check=lambda ann: require_delete(who, ann))
        return Response(status_code=204)

    @app.post("/api/annotations/{annotation_id}/accept")
    def accept(annotation_id: int, body: ReviewIn, who: Who) -> dict[str, Any]:
        return store.update_annotation(annotation_id, project_id=project_id, review_state="accepted",
                                       by=who["id"], seconds_spent=body.seconds_spent, label=body.label,
                                       expected_uuid=body.uuid, check=lambda ann: require_review(who, ann, "accepting"),
                                       declared_label=True)

    @app.post("/api/annotations/{annotation_id}/reject")
    def reject(annotation_id: int, body: ReviewIn, who: Who) -> dict[str, Any]:
        return store.update_annotation(annotation_id, project_id=project_id, review_state="rejected",
                                       by=who["id"], seconds_spent=body.seconds_spent,
                                       expected_uuid=body.uuid, check=lambda ann: require_review(who, ann, "rejecting"))

    @app.post("/api/images/{image_id}/prefill")
    def prefill(image_id: int, who: Who) -> list[dict[str, Any]]:
        """Stage 2: confident automatic masks, stored as source=semi, review_state=pending, labelled with the
        generator's class label when the model has a class head (else "object").

        Runs once per image and model version; calling again returns what is still pending.
        """
        svc = need_model()
        im = store.get_image(project_id, image_id)
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
        if Path(name).suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"):
            raise HTTPException(400, f"{name!r} is not a supported image type (jpg, png, bmp, tif, webp)")
        media_dir = Path(media)
        media_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=media_dir, prefix=".upload-", delete=False)
        size = 0
        try:
            with tmp:
                while chunk := await file.read(1 << 20):
                    size += len(chunk)
                    if size > settings.max_upload_bytes:  # bodies sent without Content-Length
                        raise HTTPException(413, f"upload exceeds {settings.max_upload_bytes} bytes")
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
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(target.rglob("*")):
                    if f.is_file() and f.name != exports.EXPORT_MARKER:  # the marker guards folders, not downloads
                        zf.write(f, f.relative_to(target))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # a failed export must not leave its files in /tmp
            raise
        shutil.rmtree(work, ignore_errors=True)
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{fmt}.zip"'})

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
