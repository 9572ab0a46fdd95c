"""The local artifact store: a directory of blobs (the embedded default).

    <root>/sha256/ab/abcdef…
    <root>/tmp/…               scratch space on the same filesystem, so that a put is a rename

A blob appears only by an atomic rename of a fully written temp file, so a reader never sees
a partial one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from edge_agent.bundle import sha256_file
from edge_agent.contracts.errors import ConfigError
from fleet_server.artifacts.base import (
    ArtifactStore,
    BlobRead,
    RangeNotSatisfiable,
    blob_key,
    sweep_scratch,
)
from fleet_server.errors import NotFoundError

_CHUNK = 1 << 16
_ONE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        if not os.access(self.root / "tmp", os.W_OK) or not os.access(
            self.root / "sha256", os.W_OK
        ):
            raise ConfigError(
                f"artifact store {self.root} is not writable by this user (fix its "
                "permissions, or set EDGEFLEET_ARTIFACTS_URL)",
                field="artifacts_url",
            )
        sweep_scratch(self.root / "tmp")

    def path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def scratch_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root / "tmp"))

    def put_file(self, src: Path, sha256: str | None = None) -> tuple[str, int]:
        size = src.stat().st_size  # before the move
        return self._commit(src, sha256 or sha256_file(src)), size

    def materialize(self, sha256: str, dest: Path) -> Path:
        path = self.path(sha256)
        if not path.is_file():
            raise NotFoundError(f"blob {sha256} is missing from the artifact store {self.url}")
        return path

    @contextlib.contextmanager
    def open(self, sha256: str) -> Iterator[IO[bytes]]:
        with self._open(sha256) as f:
            yield f

    def read(self, sha256: str, range_header: str | None) -> BlobRead:
        f = self._open(sha256)
        size = os.fstat(f.fileno()).st_size
        try:
            span = one_range(range_header, size)
        except RangeNotSatisfiable:
            f.close()
            raise
        headers = {"Accept-Ranges": "bytes"}
        if span is None:
            start, end, status = 0, size - 1, 200
        else:
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        return BlobRead(status, headers, _chunks(f, start, end - start + 1), f.close)

    def _open(self, sha256: str) -> IO[bytes]:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError as e:
            raise NotFoundError(
                f"blob {sha256} is missing from the artifact store {self.url}"
            ) from e

    def _commit(self, tmp: Path, sha256: str) -> str:
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            tmp.unlink(missing_ok=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:  # another filesystem: copy, then rename
                shutil.copyfile(tmp, final.with_suffix(".tmp"))
                os.replace(final.with_suffix(".tmp"), final)
                tmp.unlink(missing_ok=True)
        return sha256


def one_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single-range ``Range`` header, as S3 reads one: None for no
    header, several ranges or a malformed one (the whole blob is sent); raises
    :class:`RangeNotSatisfiable` when the range starts past the end."""
    m = _ONE_RANGE.match((header or "").strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # the last n bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, end


def _chunks(f: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    f.seek(start)
    while length > 0:
        chunk = f.read(min(_CHUNK, length))
        if not chunk:
            return
        length -= len(chunk)
        yield chunk
