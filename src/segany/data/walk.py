"""Listing the files below a folder the way a user expects: through linked folders, each real folder once."""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(src: Path) -> list[Path]:
    """Every file below ``src``, sorted, through linked folders too: datasets are often assembled from links,
    and ``Path.rglob`` skipped them without a word while following linked files. A linked folder whose real
    folder is already walked (a link to a parent would loop; two links to one folder would list its images
    twice) is walked once."""
    walked: set[str] = set()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in walked:
                walked.add(real)
                keep.append(d)
        dirnames[:] = keep
        files.extend(Path(dirpath) / f for f in filenames)
    return sorted(files)
