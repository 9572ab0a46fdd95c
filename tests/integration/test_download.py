"""Bundle downloads against a real HTTP server that honours (or ignores) Range and can cut a
response short: resume after interruption, the bandwidth cap, the free-space check."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.contracts.errors import TransportError
from edge_agent.store.download import InsufficientSpaceError, check_free_space, download_bundle

BLOB = bytes(range(256)) * 400  # 100 kB
SHA = hashlib.sha256(BLOB).hexdigest()


class Origin(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        self.authorizations: list[str | None] = []
        self.cut_first_at: int | None = None
        self.honour_range = True
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Origin

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        self.server.authorizations.append(self.headers.get("Authorization"))
        start = 0
        if rng and self.server.honour_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
        else:
            self.send_response(200)
        body = BLOB[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, self.server.cut_first_at = self.server.cut_first_at, None
        if cut is not None:  # a connection that drops mid-transfer
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def origin() -> Iterator[Origin]:
    srv = Origin()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


class Redirector(ThreadingHTTPServer):
    """The fleet server in presigned mode: every GET is sent on (307) to the object store."""

    def __init__(self, to: str) -> None:
        self.to = to
        self.authorizations: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _RedirectHandler)


class _RedirectHandler(BaseHTTPRequestHandler):
    server: Redirector

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.authorizations.append(self.headers.get("Authorization"))
        self.send_response(307)
        self.send_header("Location", f"{self.server.to}?X-Amz-Signature=abc")
        self.send_header("Content-Length", "0")
        self.end_headers()


def _get(origin: Origin, tmp_path: Path, url: str | None = None, **kw: object) -> Path:
    dest, part = tmp_path / "b.efb", tmp_path / "b.part"
    download_bundle(
        url or f"http://127.0.0.1:{origin.server_address[1]}/b", dest, part, size=len(BLOB),
        sha256=SHA, credential="efd_x", timeout_s=5, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return dest


def test_an_interrupted_download_resumes_where_it_stopped(origin: Origin, tmp_path: Path) -> None:
    origin.cut_first_at = 40_000
    with pytest.raises(TransportError) as e:
        _get(origin, tmp_path)
    assert e.value.fields["received_bytes"] == 40_000
    assert (tmp_path / "b.part").stat().st_size == 40_000
    dest = _get(origin, tmp_path)
    assert origin.ranges == [None, "bytes=40000-"]
    assert dest.read_bytes() == BLOB and not (tmp_path / "b.part").exists()


def test_a_server_that_ignores_range_gets_a_fresh_download(origin: Origin, tmp_path: Path) -> None:
    origin.cut_first_at = 30_000
    origin.honour_range = False
    with pytest.raises(TransportError):
        _get(origin, tmp_path)
    assert _get(origin, tmp_path).read_bytes() == BLOB


def test_a_part_file_of_other_bytes_never_passes(origin: Origin, tmp_path: Path) -> None:
    (tmp_path / "b.part").write_bytes(b"\0" * 10_000)  # not a prefix of the bundle
    from edge_agent.contracts.errors import BundleError

    with pytest.raises(BundleError) as e:
        _get(origin, tmp_path)
    assert e.value.reason == "digest_mismatch"
    assert not (tmp_path / "b.part").exists()  # so the next attempt starts clean
    assert _get(origin, tmp_path).read_bytes() == BLOB


def test_the_bandwidth_cap_paces_the_download(origin: Origin, tmp_path: Path) -> None:
    slept: list[float] = []
    now = [0.0]

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    _get(origin, tmp_path, max_bytes_per_s=20_000, sleep=sleep, clock=lambda: now[0])
    # 100 kB at 20 kB/s: the pacing adds up to ~5 s of waiting (the clock only moves by it).
    assert sum(slept) == pytest.approx(len(BLOB) / 20_000, rel=0.01)


def test_free_space_is_checked_first(tmp_path: Path) -> None:
    check_free_space(tmp_path, 1_000_000, reserve_bytes=0)
    with pytest.raises(InsufficientSpaceError) as e:
        check_free_space(tmp_path, 1_000_000, reserve_bytes=1 << 62)
    assert e.value.reason == "insufficient_space" and e.value.fields["needed_bytes"] == 2_000_000


def test_a_redirect_to_the_object_store_carries_range_and_not_the_credential(
    origin: Origin, tmp_path: Path
) -> None:
    """Presigned downloads: the server answers 307 to a URL of its object store; the resumed
    request there still asks for the rest with Range, and the device's credential, which is
    for the server alone, does not go along (S3 would refuse a request signed twice)."""
    server = Redirector(f"http://127.0.0.1:{origin.server_address[1]}/b")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/bundles/{SHA}"
        origin.cut_first_at = 30_000
        with pytest.raises(TransportError):
            _get(origin, tmp_path, url)
        dest = _get(origin, tmp_path, url)
    finally:
        server.shutdown()
    assert dest.read_bytes() == BLOB
    assert server.authorizations == ["Bearer efd_x", "Bearer efd_x"]
    assert origin.authorizations == [None, None]
    assert origin.ranges == [None, "bytes=30000-"]
