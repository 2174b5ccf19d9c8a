"""Listing the files below a folder the way a user expects: through linked folders, each real folder once."""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(src: Path) -> list[Path]:
    """Every file below ``src``, sorted, through linked folders too: datasets are often assembled from links,
    and ``Path.rglob`` skipped them without a word while following linked files.

    Each real folder is listed once, under its own path where the tree has one that is not hidden: a link to a
    folder of the tree (``.backup -> imgs``, ``0-link -> imgs``) adds nothing and renames nothing, a link to a
    parent cannot loop, and two links to one folder outside list its files once, under the first name.
    """
    claimed = _real_dirs(src)
    walked: set[str] = set()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        keep = []
        for d in sorted(dirnames):
            path = os.path.join(dirpath, d)
            real = os.path.realpath(path)
            if os.path.islink(path) and (real in claimed or real in walked):
                continue  # the tree holds that folder itself (or a link walked it already)
            walked.add(real)
            keep.append(d)
        dirnames[:] = keep
        files.extend(Path(dirpath) / f for f in filenames)
    return sorted(files)


def _real_dirs(src: Path) -> set[str]:
    """The real paths of the tree's own folders (no links followed), leaving out hidden ones: a hidden folder
    does not claim its files from a visible link to it, since a folder input leaves hidden folders out."""
    out = set()
    for dirpath, dirnames, _ in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.add(os.path.realpath(dirpath))
    return out
