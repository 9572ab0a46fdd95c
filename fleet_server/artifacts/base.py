"""The artifact store's interface (see the package's docstring)."""

from __future__ import annotations

import abc
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["STALE_SCRATCH_S", "ArtifactStore", "BlobRead", "RangeNotSatisfiable", "blob_key"]

log = logging.getLogger(__name__)

#: Scratch space in which nothing has changed for this long is what a process left when it
#: died mid-upload or mid-build: removed at the next start. No upload or build takes a day.
STALE_SCRATCH_S = 24 * 3600


@dataclass
class BlobRead:
    """A blob, or the part of it a ``Range`` header asked for, being read: ``status`` is 200
    or 206, ``headers`` the length (and ``Content-Range``) to answer with."""

    status: int
    headers: dict[str, str]
    chunks: Iterator[bytes]
    close: Callable[[], None]


class ArtifactStore(abc.ABC):
    #: Where the blobs are, for messages (a directory, or ``s3://bucket/prefix``).
    url: str

    @abc.abstractmethod
    def scratch_dir(self) -> Path:
        """A private local temp directory for files on their way in (on the store's own
        filesystem for a local store, so that :meth:`put_file` is a rename)."""

    @abc.abstractmethod
    def put_file(self, src: Path, sha256: str | None = None) -> tuple[str, int]:
        """Move ``src`` (a file this process wrote) into the store; ``sha256`` when the writer
        hashed it on the way (else it is read again to hash it). Returns (sha256, size)."""

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def materialize(self, sha256: str, dest: Path) -> Path:
        """A local file with the blob: the store's own file where it has one, else the blob
        copied to ``dest``. Raises :class:`~fleet_server.errors.NotFoundError` when absent."""

    @abc.abstractmethod
    def open(self, sha256: str) -> AbstractContextManager[IO[bytes]]:
        """The blob as a stream, read front to back."""

    @abc.abstractmethod
    def read(self, sha256: str, range_header: str | None) -> BlobRead:
        """The blob for an HTTP response, honouring a ``Range`` header as S3 does: one range
        (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) gives 206, a range past the end raises
        :class:`RangeNotSatisfiable`, anything else (several ranges, a malformed header) is
        ignored and the whole blob comes (RFC 9110 lets a server ignore ``Range``). Raises
        :class:`~fleet_server.errors.NotFoundError` when the blob is absent."""

    def presigned_url(self, sha256: str, expires_s: int) -> str | None:
        """A URL anyone holding it may GET the blob from for ``expires_s`` seconds, straight
        from the store; None when the store cannot give one."""
        return None

    @abc.abstractmethod
    def check(self) -> None:
        """Raise a :class:`~edge_agent.contracts.errors.ConfigError` that says what to fix
        when the store cannot be used (called once at start). Also removes stale scratch
        space (:func:`sweep_scratch`)."""


def sweep_scratch(root: Path, *, stale_s: float = STALE_SCRATCH_S) -> int:
    """Remove what dead processes left in the scratch directory ``root``: each entry in
    which nothing (the entry itself, or a file directly in it) has changed for ``stale_s``.
    Entries in use by a live process (another server on this host, a build) are younger.
    Returns how many entries went."""
    cutoff = time.time() - stale_s
    removed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for entry in entries:
        try:
            is_dir = entry.is_dir() and not entry.is_symlink()
            newest = entry.lstat().st_mtime
            if is_dir:
                for child in entry.iterdir():
                    newest = max(newest, child.lstat().st_mtime)
            if newest >= cutoff:
                continue
            if is_dir:
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError as e:  # gone meanwhile, or not ours to remove: leave it
            log.debug("scratch %s not swept: %s", entry, e)
    if removed:
        log.info("removed %d stale scratch entries (left by dead processes) from %s", removed, root)
    return removed


class RangeNotSatisfiable(Exception):
    """The ``Range`` asked for starts past the blob's end (HTTP 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a {size}-byte blob")
        self.size = size


def blob_key(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256}"
