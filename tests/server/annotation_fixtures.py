"""Fixtures for the server tests: a project on a bundled real image, a tiny model saved as a segany
checkpoint, a tiny model with a class head for text prompts, annotator tokens, a real uvicorn server, and a
PostgreSQL server started from scratch."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_, tiny_config

from segany.checkpoints import save_checkpoint
from segany.engine.store import Store, open_store
from segany.modeling.sam import Sam
from segany.server.app import ServerSettings, create_app
from segany.server.model_service import ModelService

SAMPLES = REPO / "src" / "segany" / "assets" / "samples"
SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))
LABELS = ("dog", "person", "car")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_checkpoint(randomize_(Sam(tiny_config()), seed=3).eval(), path)


def grid_prefill(svc_ref: dict[str, ModelService]) -> Any:
    """A deterministic stand-in for the automatic generator: decode two fixed points with the real model.

    With random weights no mask passes strict thresholds, so tests check the stage-2 pipeline
    (stored as semi/pending, shown, accepted) with this instead.
    """

    def run(image: np.ndarray) -> list[dict[str, Any]]:
        from segany.predictor import SamPredictor

        pred = SamPredictor(svc_ref["svc"].sam)
        pred.set_image(image)
        h, w = image.shape[:2]
        out = []
        for x, y in ((w * 0.3, h * 0.5), (w * 0.7, h * 0.4)):
            masks, scores, _ = pred.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
            k = int(np.argmax(scores))
            m = masks[k]
            if not m.any():  # random weights: make sure the stand-in proposes a visible region
                m = np.zeros((h, w), bool)
                m[int(y) - 20:int(y) + 20, int(x) - 30:int(x) + 30] = True
            out.append({"segmentation": m, "predicted_iou": float(scores[k]), "stability_score": 1.0,
                        "point_coords": [[x, y]]})
        return out

    return run


def label_sam() -> Sam:
    """A tiny random-weight model with a closed-vocabulary class head over LABELS whose outputs are set:
    every mask is "dog" with probability ~0.999 and a predicted IoU of 0.9, so "segment every dog" proposes
    masks (those surviving NMS) deterministically, whatever the random decoder draws."""
    from segany.train.labels import with_labels

    sam = randomize_(Sam(with_labels(tiny_config(), LABELS)), seed=5).eval()
    with torch.no_grad():
        head = sam.class_head
        assert head is not None
        head.logits.weight.zero_()
        head.logits.bias.copy_(torch.tensor([8.0, 0.0, 0.0, -8.0]))  # dog, person, car, background
        last = sam.mask_decoder.iou_prediction_head.layers[-1]
        last.weight.zero_()
        last.bias.fill_(0.9)
    return sam


@pytest.fixture
def label_app(project: tuple[Store, dict[str, Any]], onnx_cache: Path) -> Any:
    """The app over a model with a class head (text prompts work)."""
    svc = ModelService("segany_tiny_labels", device="cpu", cache_size=4, cache_dir=onnx_cache, sam=label_sam())
    return create_app(project[0], svc, ServerSettings(max_upload_bytes=2 * 1024 * 1024))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Store, dict[str, Any]]]:
    store = open_store(tmp_path / "proj", create=True)
    proj = store.create_project("demo", media_dir=tmp_path / "proj" / "images", labels=["person", "thing"])
    store.add_images(proj["id"], SAMPLE_FILES[:2])
    yield store, proj
    store.close()


@pytest.fixture
def token(project: tuple[Store, dict[str, Any]]) -> str:
    """An annotator's token (the default role: own masks and machine proposals)."""
    return project[0].add_annotator("alice")


@pytest.fixture
def reviewer_token(project: tuple[Store, dict[str, Any]]) -> str:
    return project[0].add_annotator("rita", role="reviewer")


@pytest.fixture
def admin_token(project: tuple[Store, dict[str, Any]]) -> str:
    return project[0].add_annotator("adam", role="admin")


@pytest.fixture
def model_service(tiny_checkpoint: Path, onnx_cache: Path) -> ModelService:
    ref: dict[str, ModelService] = {}
    svc = ModelService("vit_b", str(tiny_checkpoint), device="cpu", cache_size=4, cache_dir=onnx_cache,
                       prefill=grid_prefill(ref))
    ref["svc"] = svc
    return svc


@pytest.fixture
def app(project: tuple[Store, dict[str, Any]], model_service: ModelService) -> Any:
    return create_app(project[0], model_service, ServerSettings(max_upload_bytes=2 * 1024 * 1024))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           limit_concurrency=200, timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def served_demo_project(checkpoint: Path, tmp: Path, images: list[Path], onnx_cache: Path | None = None
                        ) -> Iterator[dict[str, Any]]:
    """Project "demo" (labels person, thing) holding ``images``, served by a real uvicorn server with the tiny
    model decoding on the server and grid pre-fill; yields ``store``, ``project`` and ``base`` (the URL).
    ``onnx_cache``: the session's folder of exported browser decoders (the ``onnx_cache`` fixture)."""
    store = open_store(tmp / "proj", create=True)
    proj = store.create_project("demo", media_dir=tmp / "proj" / "images", labels=["person", "thing"])
    store.add_images(proj["id"], images)
    ref: dict[str, ModelService] = {}
    svc = ModelService("vit_b", str(checkpoint), device="cpu", cache_size=4, cache_dir=onnx_cache or tmp / "onnx",
                       prefill=grid_prefill(ref))
    ref["svc"] = svc
    app = create_app(store, svc, ServerSettings(max_upload_bytes=2 * 1024 * 1024))
    try:
        with running_server(app) as base:
            yield {"store": store, "project": proj, "base": base}
    finally:
        store.close()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} not found: apt-get install postgresql")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Start a throw-away PostgreSQL server (initdb + pg_ctl) on a free port; yield its URL."""
    base = Path(tempfile.mkdtemp(prefix="segany-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    port = free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres system user
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chmod(base, 0o755)
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    subprocess.run(prefix + [_pg_bin("initdb"), "-D", str(data), "-U", "segany", "--auth=trust", "-E", "UTF8",
                             "--no-sync"], check=True, capture_output=True, env=env)
    subprocess.run(prefix + [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                             "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                                   "-c max_connections=200", "start"],
                   check=True, capture_output=True, env=env)
    try:
        subprocess.run(prefix + [_pg_bin("createdb") if glob.glob("/usr/lib/postgresql/*/bin/createdb")
                                 else "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "segany", "segany"],
                       check=True, capture_output=True, env=env)
        yield f"postgresql+psycopg://segany@127.0.0.1:{port}/segany"
    finally:
        subprocess.run(prefix + [_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, env=env)
        shutil.rmtree(base, ignore_errors=True)


def auth(tok: str) -> dict[str, str]:
    """The request headers of a signed-in annotator."""
    return {"Authorization": f"Bearer {tok}"}


def mask_body(h: int, w: int, **kw: Any) -> dict[str, Any]:
    """A save request for one rectangle on an (h, w) image, with a fresh uuid; ``kw`` adds or replaces fields."""
    import uuid

    from segany.server.app import _uncompressed_rle

    m = np.zeros((h, w), bool)
    m[20:60, 30:90] = True
    return {"uuid": str(uuid.uuid4()), "segmentation": _uncompressed_rle(m), "label": "person", **kw}
