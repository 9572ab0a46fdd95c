"""The local artifact store: content-addressed puts, and Range read as S3 reads it (one range
gives 206; past the end 416; several ranges or a malformed header give the whole blob), and
the scratch space a dead process left, removed at the next start."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fleet_server.artifacts import LocalArtifactStore, RangeNotSatisfiable
from fleet_server.artifacts.base import STALE_SCRATCH_S, sweep_scratch
from fleet_server.artifacts.local import one_range
from fleet_server.errors import NotFoundError

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (None, None),
        ("", None),
        ("bytes=0-", (0, 999)),
        ("bytes=10-19", (10, 19)),
        ("bytes=990-5000", (990, 999)),  # the end is clipped to the blob
        ("bytes=-10", (990, 999)),
        ("bytes=-5000", (0, 999)),  # more than there is: the whole blob, as 206
        ("bytes=999-999", (999, 999)),
        ("bytes=0-1,5-6", None),  # several ranges: ignored
        ("bytes=20-10", None),  # invalid: ignored
        ("items=0-10", None),
        ("bytes=-", None),
        ("bytes=a-b", None),
        ("bytes= 1-2", None),
    ],
)
def test_one_range_reads_a_header_as_s3_does(header: str | None, span: object) -> None:
    assert one_range(header, SIZE) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_past_the_end_is_not_satisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as e:
        one_range(header, SIZE)
    assert e.value.size == SIZE


def test_put_read_and_range(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "a")
    blob = bytes(range(256)) * 300
    src = store.scratch_dir() / "x"
    src.write_bytes(blob)
    sha, size = store.put_file(src)
    assert size == len(blob) and store.exists(sha) and not src.exists()
    again = store.scratch_dir() / "y"
    again.write_bytes(blob)
    assert store.put_file(again) == (sha, size) and not again.exists()  # idempotent

    whole = store.read(sha, None)
    assert whole.status == 200 and b"".join(whole.chunks) == blob
    assert whole.headers["Content-Length"] == str(len(blob))
    whole.close()
    part = store.read(sha, "bytes=70000-")
    assert part.status == 206 and b"".join(part.chunks) == blob[70000:]
    assert part.headers["Content-Range"] == f"bytes 70000-{len(blob) - 1}/{len(blob)}"
    assert part.headers["Content-Length"] == str(len(blob) - 70000)
    part.close()
    with store.open(sha) as f:
        assert f.read() == blob
    assert store.materialize(sha, tmp_path / "unused") == store.path(sha)


def test_a_missing_blob_is_not_found(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "a")
    missing = "0" * 64
    assert not store.exists(missing)
    for attempt in (
        lambda: store.read(missing, None),
        lambda: store.materialize(missing, tmp_path / "m"),
        lambda: store.open(missing).__enter__(),
    ):
        with pytest.raises(NotFoundError):
            attempt()


def _leave(root: Path, name: str, age_s: float) -> Path:
    """Scratch as a process leaves it: a directory with a half-written file, last touched
    ``age_s`` ago."""
    scratch = root / name
    scratch.mkdir()
    part = scratch / "model.onnx.part"
    part.write_bytes(b"\0" * 1024)
    then = time.time() - age_s
    for path in (part, scratch):
        os.utime(path, (then, then))
    return scratch


def test_start_up_removes_scratch_a_dead_process_left_and_keeps_what_is_in_use(
    tmp_path: Path,
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    tmp = tmp_path / "artifacts" / "tmp"
    dead = _leave(tmp, "tmpdead", STALE_SCRATCH_S + 60)
    busy = _leave(tmp, "tmpbusy", STALE_SCRATCH_S + 60)
    (busy / "written-just-now").write_bytes(b"x")  # a long upload, still going
    fresh = _leave(tmp, "tmpfresh", 60)
    stray = tmp / "stray.part"
    stray.write_bytes(b"x")
    os.utime(stray, (time.time() - 2 * STALE_SCRATCH_S,) * 2)
    store.check()
    assert not dead.exists() and not stray.exists()
    assert busy.exists() and fresh.exists()
    assert sweep_scratch(tmp) == 0  # nothing more to do
    assert sweep_scratch(tmp_path / "no-such-dir") == 0
