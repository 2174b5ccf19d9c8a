# ruff: noqa: F811  (pytest fixtures are imported from annotation_fixtures and used as arguments)
"""Findings of the fourth server audit (model service and the browser decoder's inputs): the embedding served
for an image is the embedding of the file registered, under the model that runs, and names stay stable."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from annotation_fixtures import (  # noqa: F401  (fixtures)
    SAMPLE_FILES,
    app,
    auth,
    model_service,
    tiny_checkpoint,
    token,
)
from fastapi.testclient import TestClient

from segany.engine.store import open_store
from segany.server.model_service import ModelService


@pytest.fixture
def project(tmp_path: Path) -> Any:
    """The fixtures' project, over copies of the sample images: these tests replace and delete files."""
    files = []
    for f in SAMPLE_FILES[:2]:
        files.append(tmp_path / "own" / f.name)
        files[-1].parent.mkdir(exist_ok=True)
        shutil.copyfile(f, files[-1])
    store = open_store(tmp_path / "proj", create=True)
    proj = store.create_project("demo", media_dir=tmp_path / "proj" / "images", labels=["person", "thing"])
    store.add_images(proj["id"], files)
    yield store, proj
    store.close()


@pytest.fixture
def client(app: Any) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def test_a_replaced_or_missing_file_is_refused_not_served_the_old_embedding(client: TestClient, project: Any,
                                                                             token: str) -> None:
    """The cache was keyed by image id alone: a file replaced on disk kept the old picture's embedding (and an
    id reused after a removal got the removed image's). A missing file answered 400 with the server's path."""
    store, proj = project
    im = store.list_images(proj["id"])[0]
    assert Path(im["path"]).is_relative_to(Path(store.project_dir).parent)  # a copy, never the repo's sample
    url = f"/api/images/{im['id']}/embedding"
    assert client.get(url, headers=auth(token)).status_code == 200
    original = Path(im["path"]).read_bytes()
    shutil.copyfile(SAMPLE_FILES[1], im["path"])
    r = client.get(url, headers=auth(token))
    assert r.status_code == 409 and "changed since it was registered" in r.json()["detail"]
    point = {"points": [[10, 10]], "labels": [1]}
    assert client.post(f"/api/images/{im['id']}/decode", json=point, headers=auth(token)).status_code == 409
    Path(im["path"]).write_bytes(original)  # the original back: served again
    assert client.get(url, headers=auth(token)).status_code == 200
    Path(im["path"]).unlink()
    r = client.get(url, headers=auth(token))
    assert r.status_code == 410 and im["file_name"] in r.json()["detail"]
    assert str(Path(im["path"]).parent) not in r.json()["detail"]


def test_the_embedding_cache_follows_the_file_on_disk(model_service: ModelService, tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    shutil.copyfile(SAMPLE_FILES[0], path)
    first = model_service.embedding(7, str(path))
    shutil.copyfile(SAMPLE_FILES[1], path)  # another picture under the same id and path
    second = model_service.embedding(7, str(path))
    assert not torch.equal(first.features, second.features) and model_service.cached_ids().count(7) == 2


def test_the_browser_revalidates_embeddings_by_model_and_image(client: TestClient, project: Any, token: str
                                                               ) -> None:
    """max-age=3600 on a URL naming neither the model nor the image content: after a restart with other weights
    the browser decoded the old model's embedding for an hour."""
    store, proj = project
    im = store.list_images(proj["id"])[0]
    url = f"/api/images/{im['id']}/embedding"
    r = client.get(url, headers=auth(token))
    assert r.status_code == 200 and r.headers["cache-control"] == "private, no-cache" and r.headers["etag"]
    again = client.get(url, headers={**auth(token), "If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    other = client.get(url, headers={**auth(token), "If-None-Match": '"another-model"'})
    assert other.status_code == 200 and other.content == r.content


def test_the_version_name_is_of_the_weights_loaded_and_sees_every_tensor(tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    """The name hashed the checkpoint file on every call (a file replaced while serving named the old graphs
    with the new weights' hash), and an in-memory model by 4 KiB of 8 tensors, which missed a changed decoder."""
    from segany.checkpoints import build_sam

    ckpt = tmp_path / "m.pt"
    shutil.copyfile(tiny_checkpoint, ckpt)
    svc = ModelService("vit_b", str(ckpt), device="cpu")
    name = svc.version_name
    sd = svc.sam.state_dict()
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, ckpt)  # replaced while serving
    assert svc.version_name == name
    sam = build_sam("vit_b", str(tiny_checkpoint))
    a = ModelService("vit_b", device="cpu", sam=sam).version_name
    with torch.no_grad():
        sam.mask_decoder.iou_token.weight.mul_(1.5)
    b = ModelService("vit_b", device="cpu", sam=sam).version_name
    assert a != b and a.startswith("vit_b:inmemory-")
