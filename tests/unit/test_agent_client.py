"""The Python client's own HTTP/1.1 exchange with the agent: kept-alive connections, replies
of any size, a restarted agent, and failures that say what went wrong."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from edge_agent.contracts.errors import TransportError
from edge_agent.serving import InferenceHTTPServer, SlotTable, start_http
from edge_agent.serving.client import AgentClient
from tests.unit.test_serving import scaler, serving


@pytest.fixture
def agent() -> Iterator[InferenceHTTPServer]:
    table = SlotTable()
    table.swap("main", serving(scaler(2.0), "1.0.0"))
    srv, _ = start_http(table, "127.0.0.1", 0)
    yield srv
    srv.shutdown()
    srv.server_close()


class RawServer:
    """A socket server whose every connection is handled by ``handle(conn)``; counts them."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._handle = handle
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(65536)
    return head


def test_one_connection_serves_many_requests(agent: InferenceHTTPServer) -> None:
    client = AgentClient(f"http://127.0.0.1:{agent.port}")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for i in range(50):
        np.testing.assert_array_equal(client.predict("main", {"x": x + i})["y"], (x + i) * 2)
    conn = client._local.conn
    assert client.ready() and client._local.conn is conn  # still the first connection
    client.close()


def test_large_requests_and_replies_arrive_whole(agent: InferenceHTTPServer) -> None:
    """Bodies larger than one send takes (the rest follows), replies read in many pieces."""
    client = AgentClient(f"http://127.0.0.1:{agent.port}")
    rows = (8 << 20) // 12  # three float32 a row: 8 MiB, more than a socket buffer holds
    x = np.random.default_rng(0).standard_normal((rows, 3)).astype(np.float32)
    np.testing.assert_array_equal(client.predict("main", {"x": x})["y"], x * 2)
    small = np.ones((1, 3), np.float32)  # the connection is still in step after it
    np.testing.assert_array_equal(client.predict("main", {"x": small})["y"], small * 2)
    client.close()


def test_a_connection_the_agent_closed_is_replaced_once() -> None:
    """A restarted agent leaves the kept-alive connection dead: the next call reconnects."""

    def reply(conn: socket.socket) -> None:
        read_request(conn)
        body = b'{"models": []}'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.2)  # the client reads its reply before the close
        conn.close()

    server = RawServer(reply)
    client = AgentClient(f"http://127.0.0.1:{server.port}", timeout_s=5)
    assert client.models() == []
    time.sleep(0.4)  # the server has closed that connection by now
    assert client.models() == []
    assert server.connections == 2
    server.close()
    client.close()


def test_a_timeout_is_not_retried() -> None:
    """A busy agent must not get the same request twice: the call fails after one timeout."""
    requests: list[bytes] = []

    def never_answer(conn: socket.socket) -> None:
        requests.append(read_request(conn))
        time.sleep(2)
        conn.close()

    server = RawServer(never_answer)
    client = AgentClient(f"http://127.0.0.1:{server.port}", timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(TransportError, match=f"127.0.0.1:{server.port}"):
        client.predict("main", {"x": np.ones((1, 3), np.float32)})
    assert time.monotonic() - start < 1.5
    assert len(requests) == 1 and server.connections == 1
    server.close()


def test_nothing_listening_is_a_transport_error_naming_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = AgentClient(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(TransportError, match=f"127.0.0.1:{port} unreachable"):
        client.models()
    assert not client.ready()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP reply"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "mid-reply"),
    ],
)
def test_replies_the_client_cannot_read_are_named(reply: bytes, message: str) -> None:
    def answer(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(reply)
        conn.close()

    server = RawServer(answer)
    client = AgentClient(f"http://127.0.0.1:{server.port}", timeout_s=5)
    with pytest.raises(TransportError, match=message):
        client.models()
    assert server.connections == 1  # a broken reply is not a stale connection: no retry
    server.close()


def test_request_heads_are_reused_only_for_the_same_shape_and_dtype(
    agent: InferenceHTTPServer,
) -> None:
    client = AgentClient(f"http://127.0.0.1:{agent.port}")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for arr in (x, np.tile(x, (3, 1)), x.astype(np.float64), x.astype(">f4"), x[:, ::-1], x):
        np.testing.assert_array_equal(client.predict("main", {"x": arr})["y"], arr * 2)
    assert len(client._heads) == 4  # (2,3) f4, (6,3) f4, (2,3) f8, (2,3) >f4
    client.close()


def test_an_input_name_cannot_smuggle_headers(agent: InferenceHTTPServer) -> None:
    client = AgentClient(f"http://127.0.0.1:{agent.port}")
    with pytest.raises(ValueError, match="cannot go in a header"):
        client.predict("main", {"x\r\nX-Evil: 1": np.ones((1, 3), np.float32)})
