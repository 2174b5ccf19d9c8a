"""File digests, streamed in 1 MiB chunks so multi-GB checkpoints never sit in memory whole."""

from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike[str], algo: str = "sha256", **params: int) -> str:
    """Hex digest of a file's bytes with ``hashlib`` algorithm ``algo`` (``params`` such as blake2b's
    ``digest_size`` go to ``hashlib.new``)."""
    h = hashlib.new(algo, **params)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
