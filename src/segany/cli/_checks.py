"""Checks on output paths that commands run before any work, so a bad ``--out`` fails in a second, not at the end."""

from __future__ import annotations

import os
from pathlib import Path

from segany.errors import InputError


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Make sure ``path`` is, or can become, a writable folder; creates nothing.

    ``option`` names where the path came from (``--out``, ``run.out_dir``) so the message points at it.
    """
    if not str(path).strip():  # Path("") is ".": the outputs would land in the current folder unasked
        raise InputError(f"{option} is empty; pass a folder path (it is created if missing), e.g. {option} out, "
                         "or . for the current folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{option} {str(p)!r} is an existing file, not a folder; pass a folder path "
                         "(it is created if missing)")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise InputError(f"{option} {str(p)!r} cannot be created: {str(base)!r} is a file; pass another folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{option} {str(p)!r} cannot be written: no write permission in {str(base)!r}; "
                         "pass a folder you can write to")
    return p


def check_out_file(path: str | os.PathLike[str], option: str) -> Path:
    """Make sure ``path`` can be written as a file (its folder may be created); creates nothing."""
    if not str(path).strip():
        raise InputError(f"{option} is empty; pass a file path, e.g. {option} model.pt")
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} {str(p)!r} is a folder; pass a file path, e.g. {str(p / 'model.pt')!r}")
    check_out_dir(p.parent, f"the folder of {option}")
    return p
