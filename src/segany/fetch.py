"""Resumable HTTP(S) transfers into a ``.part`` file, for the weights download (:func:`segany.checkpoints.download`).

Why: a ViT-H checkpoint is 2.5 GB. A transfer cut at 95 % (a dropped connection, Ctrl-C, a full disk) used to
start again from byte 0. The bytes received are kept in a hidden ``.part`` file beside the target, and the
next attempt asks the server for the rest (an HTTP ``Range`` request). A server that does not serve ranges
answers with the whole file, which then replaces the part. Whether the joined file is the right one is the
caller's check (size and hashes): a part whose remote file changed in between fails it and is discarded.

Two processes fetching one file would append to one part; the part is locked (``flock``) while a transfer
writes it, and the second process is refused with a message instead.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# What a broken network looks like: a refused or cut connection (IncompleteRead is an HTTPException, not an
# OSError), a timeout. Errors of the local file are not among them: they are the disk's, and said as such.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)
CHUNK = 1 << 20


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
    size now; ``total`` the size the server announced (None when it did not say)."""

    resumed_from: int
    size: int
    total: int | None


def part_path(dest: Path) -> Path:
    """The hidden part file of ``dest`` (hidden: a cache listing never takes it for weights)."""
    return dest.with_name(f".{dest.name}.part")


@contextlib.contextmanager
def locked_part(part: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``part`` (created empty if missing); :class:`PartBusyError` if another process
    holds it. An empty part left by a failed first attempt is removed on the way out."""
    part.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one download at a time is then up to the user
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise PartBusyError(str(part)) from exc
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if part.exists() and part.stat().st_size == 0:
                    part.unlink()
    finally:
        os.close(fd)


def fetch_into(url: str, part: Path, *, timeout: float,
               progress: Callable[[int, int | None], None] | None = None) -> Transfer:
    """Fetch ``url`` into ``part``, continuing from the bytes already in it when the server serves ranges.

    Raises :class:`TransferError` on a network failure (the bytes received stay in ``part``); an error of the
    local file (a full disk) propagates as the ``OSError`` it is. Call it inside :func:`locked_part`.
    """
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if have and exc.code == 416:  # nothing after byte ``have``: the part already holds the whole file
            return Transfer(have, have, None)
        raise TransferError(exc, have) from exc
    except NETWORK_ERRORS as exc:
        raise TransferError(exc, have) from exc
    with response as resp:
        resumed = have if have and getattr(resp, "status", None) == 206 else 0  # else the whole file again
        length = resp.headers.get("Content-Length")  # file:// responses carry it too
        total = resumed + int(length) if length else None
        done = resumed
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except NETWORK_ERRORS as exc:
                    out.flush()
                    raise TransferError(exc, done) from exc
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())  # a later attempt trusts these bytes
    return Transfer(resumed, done, total)
