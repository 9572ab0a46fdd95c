"""A client without a token cannot make the server read, parse or spool a body; declared and
actual body sizes are bounded per route; slow clients do not hold other clients up; numbers
out of range and the last admin token's revocation are refused; the OpenAPI document names
every error status. All against the real server over real sockets."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

MIB = 1 << 20


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"body_chunk_timeout_s": 1.0, "max_upload_bytes": 2 * MIB})


def _exchange(
    stack: EmbeddedStack, head: str, body: bytes = b"", read_s: float = 5
) -> tuple[int, dict[str, Any]]:
    """Send a request head (and ``body``), read the reply; the server may answer before the
    body it was promised (then it never reads it)."""
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_s) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(payload)
    except ValueError:  # the HTTP layer's own plain-text answer (e.g. to a malformed head)
        return status, {}


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _head(method: str, path: str, *headers: str) -> str:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", *headers, ""])


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def test_no_token_no_body_read(stack: EmbeddedStack, settings: Settings) -> None:
    before = _rss_mib()
    # 300 MB promised, 1 MB sent: the 401 comes from the headers alone.
    status, body = _exchange(
        stack,
        _head(
            "POST", "/v1/rollouts", "Content-Type: application/json", f"Content-Length: {300 * MIB}"
        ),
        b"{" + b" " * MIB,
    )
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    status, _ = _exchange(
        stack,
        _head(
            "POST",
            "/v1/models",
            "Content-Type: multipart/form-data; boundary=x",
            f"Content-Length: {300 * MIB}",
        ),
        b"--x\r\n" + b"y" * MIB,
    )
    assert status == 401
    spooled = list((settings.data_dir / "artifacts" / "tmp").glob("**/*"))
    assert spooled == []
    assert _rss_mib() - before < 50


def test_declared_lengths_over_the_limit_are_refused_at_once(stack: EmbeddedStack) -> None:
    auth = f"Authorization: Bearer {ADMIN_TOKEN}"
    status, body = _exchange(
        stack,
        _head(
            "POST",
            "/v1/rollouts",
            auth,
            "Content-Type: application/json",
            f"Content-Length: {2 << 30}",
        ),
    )
    assert status == 413 and body["error"]["code"] == "too_large"
    status, _ = _exchange(
        stack,
        _head(
            "POST", "/v1/devices/enroll", "Content-Type: application/json", f"Content-Length: {MIB}"
        ),
    )
    assert status == 413  # enrollment needs no token, and takes 64 KiB at most
    status, _ = _exchange(stack, _head("POST", "/v1/rollouts", auth, "Content-Length: 12x"))
    assert status == 400  # h11 refuses it before the application sees it


def test_a_chunked_body_is_cut_off_at_the_limit(stack: EmbeddedStack) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            yield b" " * MIB

    r = httpx.post(
        f"{stack.url}/v1/rollouts",
        content=chunks(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_an_upload_over_the_limit_is_cut_off_as_it_arrives(
    stack: EmbeddedStack, settings: Settings
) -> None:
    boundary = "b0undary"

    def chunks() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n\r\n'
        ).encode()
        for _ in range(3):  # 3 MiB against a 2 MiB limit, with no Content-Length
            yield b"\0" * MIB

    r = httpx.post(
        f"{stack.url}/v1/models",
        content=chunks(),
        headers={
            "Authorization": f"Bearer {ADMIN_TOKEN}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=10,
    )
    assert r.status_code == 413, r.text
    stored = [p for p in (settings.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert stored == []


def test_slow_clients_do_not_hold_up_the_others(stack: EmbeddedStack) -> None:
    host, port = stack.url.removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(40):  # slowloris: heads that never finish
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST /v1/rollouts HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        start = time.monotonic()
        assert httpx.get(f"{stack.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - start < 2
        # A body that trickles is cut off after the chunk timeout (1 s here).
        trickle = socket.create_connection((host, int(port)), timeout=5)
        slow.append(trickle)
        trickle.sendall(
            _head(
                "POST",
                "/v1/rollouts",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "Content-Length: 100",
            ).encode()
            + b"\r\n{"
        )
        reply = trickle.recv(4096)
        assert b" 408 " in reply.split(b"\r\n")[0], reply[:200]
    finally:
        for s in slow:
            s.close()


def test_numbers_out_of_range_are_422_not_500(api: ApiClient) -> None:
    for ttl in (999_999_999, -5, 0):
        with pytest.raises(ApiError) as e:
            api.post("/v1/keys/online", json={"ttl_days": ttl})
        assert e.value.status == 422, (ttl, e.value)
    with pytest.raises(ApiError) as e:
        api.request("DELETE", f"/v1/tokens/{10**30}")
    assert e.value.status == 422


def test_the_last_admin_token_cannot_be_revoked(api: ApiClient) -> None:
    tokens = api.get("/v1/tokens")
    [admin] = [t for t in tokens if t["role"] == "admin" and t["revoked_at"] is None]
    with pytest.raises(ApiError) as e:
        api.request("DELETE", f"/v1/tokens/{admin['id']}")
    assert e.value.status == 409 and e.value.reason == "last_admin"
    second = api.post("/v1/tokens", json={"name": "second-admin", "role": "admin"})
    other = ApiClient(api.base_url, second["token"])
    try:
        other.request("DELETE", f"/v1/tokens/{admin['id']}")
        assert other.get("/v1/tokens")  # the second admin still works
        with pytest.raises(ApiError) as e:
            other.request("DELETE", f"/v1/tokens/{second['id']}")
        assert e.value.reason == "last_admin"
    finally:
        other.close()


def test_openapi_names_every_error_status(stack: EmbeddedStack) -> None:
    doc = httpx.get(f"{stack.url}/openapi.json").json()
    for path, methods in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in methods.items():
            for status in ("401", "403", "404", "409", "413", "422"):
                assert status in op["responses"], (method, path, status)
            ref = op["responses"]["413"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody")
