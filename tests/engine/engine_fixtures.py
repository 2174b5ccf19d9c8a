"""Shared setup for the data-engine stage-3/retrain/report tests: a tiny checkpoint and small projects."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from conftest import SHARED_DATA  # noqa: F401  (re-exported for the engine tests: one definition of the data path)
from PIL import Image

from segany.engine.auto import AutoSettings

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLES = REPO / "src" / "segany" / "assets" / "samples"


def generator_name() -> str:
    """The real automatic mask generator when installed, else the grid stand-in (see grid_generator.py)."""
    if importlib.util.find_spec("segany.amg") is not None:
        return "segany.amg:SamAutomaticMaskGenerator"
    return "grid_generator:GridGenerator"


def use_test_generator_path() -> None:
    """Make ``grid_generator`` importable in spawned processes, Ray workers and CLI subprocesses."""
    paths = os.environ.get("PYTHONPATH", "")
    if str(HERE) not in paths.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), paths) if p)


def auto_settings() -> AutoSettings:
    # Random weights predict low IoUs: zero thresholds keep some masks so results can be compared.
    return AutoSettings(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        box_nms_thresh=0.7, max_masks=8, generator=generator_name())


def save_tiny_checkpoint(path: Path) -> Path:
    from conftest import randomize_, tiny_config

    from segany.checkpoints import save_checkpoint
    from segany.modeling.sam import Sam

    return save_checkpoint(randomize_(Sam(tiny_config())).eval(), path)


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct small images from the bundled samples (flips and crops, so their hashes differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(SAMPLES.glob("*.jpg"))
    out = []
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as im:
            im = im.convert("RGB")
            im.thumbnail((320, 320))
            arr = np.asarray(im)
        if (i // len(sources)) % 2:
            arr = arr[:, ::-1]
        arr = arr[: arr.shape[0] - (i // len(sources)) * 3]
        p = folder / f"img{i:02d}.png"
        Image.fromarray(np.ascontiguousarray(arr)).save(p)
        out.append(p)
    return out


def make_project(root: Path, images: list[Path], name: str = "p") -> tuple[object, dict]:
    from segany.engine.store import open_store

    store = open_store(root, create=True)
    proj = store.create_project(name)
    store.add_images(proj["id"], images)
    return store, proj


def seed_store_at(folder: Path, revision: str, annotations: dict[str, str]) -> None:
    """A store in ``folder`` migrated only to ``revision`` (an older schema), holding project 1 ('demo'), image 1
    (4×4, sha256 'abc') and one annotation per ``uuid -> prompts JSON`` on it, written in plain SQL as a store
    of that age would have; migration tests then open it (upgrading to head) and check what survived."""
    from sqlalchemy import text

    from segany.engine.store import make_engine, migrate

    folder.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{folder / 'segany.db'}")
    try:
        migrate(engine, revision)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (name, stage, labels, settings, created_at) "
                              "VALUES ('demo', 'manual', '[]', '{}', '2025-01-01')"))
            conn.execute(text("INSERT INTO images (project_id, path, file_name, width, height, sha256, created_at) "
                              "VALUES (1, 'x.jpg', 'x.jpg', 4, 4, 'abc', '2025-01-01')"))
            for uid, prompts in annotations.items():
                conn.execute(text("INSERT INTO annotations (uuid, image_id, label, rle_counts, height, width, area, "
                                  "bbox_xywh, source, review_state, prompts, revision, created_at, updated_at) "
                                  "VALUES (:u, 1, 'cat', '4', 4, 4, 0, '[0, 0, 0, 0]', 'manual', 'accepted', :p, 1, "
                                  "'2025-01-01', '2025-01-01')"), {"u": uid, "p": prompts})
    finally:
        engine.dispose()


def box_mask(h: int, w: int, k: int = 0) -> np.ndarray:
    """An (h, w) mask holding one rectangle, shifted by ``k``: distinct, overlapping masks for the same image."""
    m = np.zeros((h, w), dtype=bool)
    m[4 + 3 * k: 30 + 3 * k, 5 + 4 * k: 40 + 4 * k] = True
    return m
