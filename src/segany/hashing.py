"""File digests, streamed in 1 MiB chunks so multi-GB checkpoints never sit in memory whole."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_digest(path: str | os.PathLike[str], algo: str = "sha256", **params: int) -> str:
    """Hex digest of a file's bytes with ``hashlib`` algorithm ``algo`` (``params`` such as blake2b's
    ``digest_size`` go to ``hashlib.new``)."""
    h = hashlib.new(algo, **params)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file, or of a weights folder (a Hugging Face layout, sharded or not): over each
    file's name and sha256, in name order, so the same files give the same digest wherever they lie."""
    p = Path(path)
    if not p.is_dir():
        return file_digest(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.is_file()):
        h.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return h.hexdigest()
