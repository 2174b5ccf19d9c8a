"""The engine's pure reads (stage 3's plans and counts, exports' checks, dataset versions, the report) open
read-only transactions: on SQLite they read their snapshot while another process writes, where they used to take
the write lock at BEGIN and queue behind a long import or removal (failing with 'database is locked' after the
30 s busy timeout). A write in one would raise ReadOnlyTransactionError, so each call here also proves it reads
only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_fixtures import make_images
from sqlalchemy import text

from segany.engine import auto, exports, report, versions
from segany.engine.auto import AutoSettings, ImageResult, MaskRecord, write_result
from segany.engine.masks import encode_mask
from segany.engine.store import open_store


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Any]:
    """A project with two images, a manual mask on each, one image done by stage 3, and a dataset version."""
    store = open_store(tmp_path / "proj", create=True)
    pid = store.create_project("p")["id"]
    images = store.add_images(pid, make_images(tmp_path / "images", 2))
    for im in images:
        m = np.zeros((im["height"], im["width"]), bool)
        m[10:40, 20:60] = True
        store.save_annotation(im["id"], mask=m, label="thing", prompts={"imported_from": str(tmp_path / "gt.json")})
    mv = auto.register_model(store, auto.ModelSpec("segany_tiny"))
    first = images[0]
    rle = encode_mask(np.pad(np.ones((4, 4), bool), ((1, first["height"] - 5), (1, first["width"] - 5))))
    write_result(store, ImageResult(first["id"], first["sha256"], [MaskRecord(rle, 0.9, 0.9, [[2.0, 2.0]], [])], 0.1),
                 model_version_id=mv, settings=AutoSettings())
    store.create_dataset_version(pid, "v1")
    store.close()
    return {"root": tmp_path / "proj", "pid": pid, "mv": mv, "tmp": tmp_path}


def test_engine_reads_do_not_wait_for_a_write(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "_plots", lambda *args: [])  # the report's reads are tested, not its drawing
    monkeypatch.setattr(report, "_throughput_plot", lambda *args: None)
    writer, reader = open_store(project["root"]), open_store(project["root"])  # two processes, as SQLite sees it
    pid, mv, tmp = project["pid"], project["mv"], project["tmp"]
    dv = versions.list_versions(reader, None)[0]["id"]
    reads: dict[str, Callable[[], Any]] = {
        "auto.pending_tasks": lambda: auto.pending_tasks(reader, pid),
        "auto.count_sets": lambda: auto.count_sets(reader, pid),
        "auto.done_differently": lambda: auto.done_differently(reader, pid, AutoSettings().digest(), mv),
        "auto describes a model": lambda: auto._describe_model(reader, mv),
        "exports' registered image paths": lambda: exports._image_paths(reader),
        "exports' earlier imports": lambda: exports._earlier_imports(reader, pid, tmp / "gt.json"),
        "versions.list_versions": lambda: versions.list_versions(reader, None),
        "versions.snapshot_items": lambda: versions.snapshot_items(reader, dv),
        "versions.export_version_coco": lambda: versions.export_version_coco(reader, None, "v1", tmp / "v1.json"),
        "report.build_report": lambda: report.build_report(reader, None, tmp / "report", report.ReportSettings()),
    }
    holding, release = threading.Event(), threading.Event()
    finished: dict[str, Any] = {}

    def long_write() -> None:  # an import or a removal in another process
        with writer.transaction() as s:
            s.execute(text("UPDATE projects SET stage = 'semi'"))
            holding.set()
            release.wait(60)

    def run(name: str, read: Callable[[], Any]) -> None:
        try:
            finished[name] = read()
        except Exception as exc:  # noqa: BLE001 - reported below
            finished[name] = exc

    holder = threading.Thread(target=long_write)
    holder.start()
    threads = [threading.Thread(target=run, args=item) for item in reads.items()]
    try:
        assert holding.wait(10)
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        waited = [name for name in reads if name not in finished]
        assert not waited, f"these reads waited for the write: {waited}"
    finally:
        release.set()
        holder.join()
        for t in threads:
            t.join()
        writer.close()
        reader.close()
    failed = {name: value for name, value in finished.items() if isinstance(value, Exception)}
    assert not failed
    assert finished["auto.count_sets"] and finished["versions.snapshot_items"]
    assert len(finished["exports' earlier imports"]) == 2 and finished["auto.pending_tasks"][1] == 1
