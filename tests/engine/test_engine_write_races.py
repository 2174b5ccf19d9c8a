"""Stage 3's result writes and the store's saves racing other clients on PostgreSQL (READ COMMITTED, where two
transactions really run at once; SQLite's writers queue).

Each race is made deterministic as in test_store_postgres.py: one transaction is held open at the decisive point
and the test waits until PostgreSQL reports the other client blocked on its lock before letting it go on. What
used to happen: a result for an image being removed, a second driver's result for an image another driver was
writing, and an annotation saved on an image being removed each failed with a raw IntegrityError, which ended the
whole `engine auto` run (it only passes over an InputError) or answered 500 in the server.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, select
from test_store_postgres import (  # noqa: F401  (the fixtures: PostgreSQL, a database, two clients of it)
    _images,
    _name,
    _race,
    _wait_until_blocked,
    postgres_url,
    races_url,
    two_stores,
)

from segany.engine import auto
from segany.engine.auto import AutoSettings, ImageResult, MaskRecord, write_result
from segany.engine.db import Annotation, Image, ImageRun
from segany.engine.masks import encode_mask
from segany.engine.store import NotFoundError, Store

pytestmark = pytest.mark.postgres


@pytest.fixture
def clients(two_stores: tuple[Store, Store]) -> tuple[Store, Store]:  # noqa: F811
    """Two clients of one database (test_store_postgres's two_stores)."""
    return two_stores


def _project_with_image(store: Store, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    pid = store.create_project(_name("p"))["id"]
    return pid, store.add_images(pid, _images(tmp_path / "im", 1))[0]


def _mask(im: dict[str, Any]) -> np.ndarray:
    m = np.zeros((im["height"], im["width"]), bool)
    m[2:9, 3:7] = True
    return m


def _result(im: dict[str, Any]) -> ImageResult:
    """What a worker sends back for ``im``: one mask."""
    return ImageResult(im["id"], im["sha256"], [MaskRecord(rle=encode_mask(_mask(im)), predicted_iou=0.9,
                                                           stability_score=0.95, point_coords=[[1.0, 2.0]],
                                                           crop_box=[0, 0, im["width"], im["height"]])], 0.1)


def _removing(image_id: int) -> Any:
    def hold(s: Any) -> None:  # what remove_images does, not committed yet
        s.delete(s.get(Image, image_id))
    return hold


def _stored(store: Store, image_id: int) -> tuple[int, int]:
    """(annotations, done markers) of the image."""
    with store.transaction(write=False) as s:
        return (len(list(s.scalars(select(Annotation.id).where(Annotation.image_id == image_id)))),
                len(list(s.scalars(select(ImageRun.id).where(ImageRun.image_id == image_id)))))


def test_a_result_for_an_image_being_removed_is_dropped(clients: tuple[Store, Store], tmp_path: Path) -> None:
    """The removal commits while the driver writes: the result is dropped (as for an image already gone), not a
    ForeignKeyViolation that stopped the run."""
    a, b = clients
    pid, im = _project_with_image(a, tmp_path)
    written = _race(a, _removing(im["id"]),
                    lambda: write_result(b, _result(im), model_version_id=None, settings=AutoSettings()))
    assert written is False
    assert a.list_images(pid) == [] and _stored(a, im["id"]) == (0, 0)


def test_an_integrity_error_for_a_removed_image_still_drops_the_result(clients: tuple[Store, Store],
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the row lock (a database that ignores it), the foreign-key error is read as "image gone"."""
    monkeypatch.setattr(auto, "_lock_image", lambda s, image_id: s.get(Image, image_id))
    a, b = clients
    pid, im = _project_with_image(a, tmp_path)
    written = _race(a, _removing(im["id"]),
                    lambda: write_result(b, _result(im), model_version_id=None, settings=AutoSettings()))
    assert written is False and a.list_images(pid) == []


def test_two_drivers_writing_one_image_write_it_once(clients: tuple[Store, Store], tmp_path: Path) -> None:
    """Only after a failed claim (a takeover), but then: the first driver is stopped inside its transaction, just
    after inserting the done marker; the second must wait for it and drop its result as a duplicate (both passed
    the marker check, and the second failed on a unique key)."""
    a, b = clients
    _, im = _project_with_image(a, tmp_path)
    inside, go = threading.Event(), threading.Event()

    def pause(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO IMAGE_RUNS"):
            inside.set()
            go.wait(30)

    event.listen(a.engine, "after_cursor_execute", pause)
    out: dict[str, Any] = {}

    def drive(name: str, store: Store) -> None:
        try:
            out[name] = write_result(store, _result(im), model_version_id=None, settings=AutoSettings())
        except Exception as exc:  # noqa: BLE001 - the test reports it
            out[name] = exc

    first = threading.Thread(target=drive, args=("first", a))
    second = threading.Thread(target=drive, args=("second", b))
    first.start()
    try:
        assert inside.wait(30)
        second.start()
        _wait_until_blocked(b)
    finally:
        go.set()
        first.join(30)
        if second.ident is not None:  # started
            second.join(30)
    event.remove(a.engine, "after_cursor_execute", pause)
    assert out == {"first": True, "second": False}
    assert _stored(a, im["id"]) == (1, 1)


def test_a_save_on_an_image_being_removed_is_not_found(clients: tuple[Store, Store], tmp_path: Path) -> None:
    """The server's save of a mask on an image an admin is removing answers 404 (NotFoundError), not a 500 from
    the foreign key (the retry for a reused uuid re-raised the IntegrityError)."""
    a, b = clients
    pid, im = _project_with_image(a, tmp_path)
    with pytest.raises(NotFoundError, match=f"no image with id {im['id']}"):
        _race(a, _removing(im["id"]), lambda: b.save_annotation(im["id"], mask=_mask(im), label="cat"))
    assert a.list_images(pid) == []
