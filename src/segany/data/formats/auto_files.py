"""Names of the files ``segany auto`` keeps beside its SA-1B outputs: its records, not an image's masks.

Why a module of its own: the CLI writes and resumes from them (:mod:`segany.cli.auto_resume`) and the data
layer must skip them when it packs such a folder for training (:mod:`segany.data.formats.sa1b`); the data
layer does not import the CLI, so both import the names from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
IDS_FILE = "image_ids.json"
MANIFEST_FILE = "manifest.json"
COCO_RESULTS_FILE = "coco_results.json"
COCO_IMAGES_FILE = "coco_images.json"
BOOKKEEPING = (RUN_FILE, IDS_FILE, MANIFEST_FILE, COCO_RESULTS_FILE, COCO_IMAGES_FILE)


def recorded_settings(out: Path) -> dict[str, Any] | None:
    """The settings of the run recorded in ``out``'s run.json, or None when there is no readable record."""
    try:
        data = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = data.get("settings") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else None


def is_run_record(folder: Path) -> bool:
    """Whether ``folder`` holds a ``segany auto`` output: its run.json records a run (with a format)."""
    return "format" in (recorded_settings(folder) or {})
