"""Resumable HTTP(S) transfers into a ``.part`` file, for the weights download (:func:`segany.checkpoints.download`).

Why: a ViT-H checkpoint is 2.5 GB. A transfer cut at 95 % (a dropped connection, Ctrl-C, a full disk) used to
start again from byte 0. The bytes received are kept in a hidden ``.part`` file beside the target, and the
next attempt asks the server for the rest (an HTTP ``Range`` request).

Only the same remote file is continued. The first answer's validator (its ``ETag``, else ``Last-Modified``) is
kept beside the part (``.part.json``) and sent back as ``If-Range``: a server whose file changed answers with
the whole new file, which replaces the part. Without a validator the part is continued only where the caller
can check the joined file (``resume_unchecked=False``: no size or hash to check it by), since a file that moved
on (a branch URL) would otherwise be joined from two versions. A ranged answer is used only when its
``Content-Range`` starts where the part ends; one that does not is refetched whole, and short ranges are asked
for again until the file is complete.

One process writes a part at a time: the part is locked (``flock``) while a transfer writes it, and all writes
go through the locked descriptor, so a second process is refused with a message instead of appending to it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# What a broken network looks like: a refused or cut connection (IncompleteRead is an HTTPException, not an
# OSError), a timeout. Errors of the local file are not among them: they are the disk's, and said as such.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)
CHUNK = 1 << 20
MAX_REQUESTS = 64  # ranged requests per transfer: a server that sends short ranges is asked again, within reason


class TransferError(Exception):
    """The network failed; ``kept`` bytes of the file are in the part, for the next attempt to continue from."""

    def __init__(self, cause: BaseException, kept: int) -> None:
        super().__init__(str(getattr(cause, "reason", cause)))
        self.cause, self.kept = cause, kept


class PartBusyError(Exception):
    """Another process is writing this part."""


@dataclass
class Transfer:
    """What a completed :func:`fetch_into` did: ``resumed_from`` bytes were already there; ``size`` is the part's
    size now; ``total`` the file's size as the server gave it (None when it did not say)."""

    resumed_from: int
    size: int
    total: int | None


def part_path(dest: Path) -> Path:
    """The hidden part file of ``dest`` (hidden: a cache listing never takes it for weights)."""
    return dest.with_name(f".{dest.name}.part")


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


@contextlib.contextmanager
def locked_part(part: Path) -> Iterator[BinaryIO]:
    """The part, opened for reading and writing and locked (``flock``) for this process; :class:`PartBusyError`
    if another holds it. Write through the yielded file: the lock is on it, not on the path. An empty part
    (nothing received) is removed on the way out, if it is still this file."""
    part.parent.mkdir(parents=True, exist_ok=True)
    f = open(part, "a+b")  # noqa: SIM115 - held across the transfer, closed below
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one download at a time is then up to the user
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise PartBusyError(str(part)) from exc
            # The lock is on the file opened, which another process may have renamed into place (or removed)
            # between our open and our lock: then it is not the part, and writing it would damage that file.
            try:
                same = os.stat(part).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise PartBusyError(str(part))
        try:
            yield f
        finally:
            with contextlib.suppress(OSError):
                mine = os.fstat(f.fileno())
                if mine.st_size == 0 and part.exists() and os.stat(part).st_ino == mine.st_ino:
                    part.unlink()
                    _meta_path(part).unlink(missing_ok=True)
    finally:
        f.close()


def finished(part: Path) -> None:
    """Forget the part's validator once the part became the file (or was discarded)."""
    _meta_path(part).unlink(missing_ok=True)


def fetch_into(url: str, part: Path, out: BinaryIO, *, timeout: float, resume_unchecked: bool = True,
               progress: Callable[[int, int | None], None] | None = None) -> Transfer:
    """Fetch ``url`` into ``out`` (the locked ``part``, see :func:`locked_part`), continuing from the bytes
    already in it when the server can send the rest of the same file.

    Raises :class:`TransferError` on a network failure (the bytes received stay in the part); an error of the
    local file (a full disk) propagates as the ``OSError`` it is.
    """
    have = os.fstat(out.fileno()).st_size
    validator = _read_validator(part)
    if have and validator is None and not resume_unchecked:
        have = _restart(out, part)  # nothing would tell a file that moved on from this one
    resumed_from = have
    total: int | None = None
    whole = 0  # answers that were the whole file
    for _ in range(MAX_REQUESTS):
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and validator:
            headers["If-Range"] = validator
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            size = _complete_length(exc.headers.get("Content-Range")) if exc.code == 416 else None
            if have and exc.code == 416 and size in (None, have):  # nothing after byte ``have``: whole already
                return Transfer(resumed_from, have, size)
            if have and exc.code == 416:  # the part is not a start of this file: fetch it whole
                have = resumed_from = _restart(out, part)
                continue
            raise TransferError(exc, have) from exc
        except NETWORK_ERRORS as exc:
            raise TransferError(exc, have) from exc
        with response as resp:
            start, size = _range(resp) if have else (None, None)
            if not have or start != have:  # a whole file (a 200, or a range that does not continue the part)
                have = resumed_from = _restart(out, part) if have else 0
                validator = _write_validator(part, resp.headers)
                length = resp.headers.get("Content-Length")
                total = int(length) if length and start is None else size
                if start not in (None, 0):  # a range from elsewhere: ask for the whole file instead
                    continue
            else:
                total = size
            whole += not (start is not None and start == have)
            if progress:
                progress(have, total)
            before = have
            have = _copy(resp, out, have, total, progress)
        # Asked again for the rest while ranges move the part on (a server that sends short ones), and once after
        # a whole answer cut short; not after a second whole answer, which a server that ignores ranges would
        # send for every request (the whole file, up to MAX_REQUESTS times).
        if total is None or have >= total or have == before or whole >= 2:
            break
    return Transfer(resumed_from, have, total)


def _copy(resp: Any, out: BinaryIO, have: int, total: int | None,
          progress: Callable[[int, int | None], None] | None) -> int:
    out.seek(0, os.SEEK_END)
    while True:
        try:
            chunk = resp.read(CHUNK)
        except NETWORK_ERRORS as exc:
            out.flush()
            raise TransferError(exc, have) from exc
        if not chunk:
            break
        out.write(chunk)
        have += len(chunk)
        if progress:
            progress(have, total)
    out.flush()
    os.fsync(out.fileno())  # a later attempt trusts these bytes
    return have


def _restart(out: BinaryIO, part: Path) -> int:
    out.truncate(0)
    finished(part)
    return 0


def _range(resp: Any) -> tuple[int | None, int | None]:
    """(first byte, complete length) of a ranged answer; (None, None) for a whole file (a 200, or file://)."""
    if getattr(resp, "status", None) != 206:
        return None, None
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", resp.headers.get("Content-Range") or "")
    if m is None:
        return -1, None  # a 206 without a usable Content-Range: not trusted to continue the part
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _complete_length(content_range: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", content_range or "")
    return int(m.group(1)) if m else None


def _read_validator(part: Path) -> str | None:
    try:
        value = json.loads(_meta_path(part).read_text(encoding="utf-8")).get("validator")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _write_validator(part: Path, headers: Any) -> str | None:
    """Keep the answer's ETag (a strong one), else its Last-Modified, for the next request's If-Range; returns
    it (None when the answer has neither)."""
    etag = headers.get("ETag") or ""
    value = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    meta = _meta_path(part)
    if value:
        from segany.atomic import atomic_write_json

        atomic_write_json(meta, {"validator": value})
    else:
        meta.unlink(missing_ok=True)
    return value or None
