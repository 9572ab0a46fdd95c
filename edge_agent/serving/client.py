"""A small Python client for the agent's local inference API (standard library only).

    from edge_agent.serving.client import AgentClient
    client = AgentClient("http://127.0.0.1:8651")
    outputs = client.predict("classifier", {"x": batch})

A single tensor travels as raw bytes with its dtype and shape in headers, several as ``.npz``
(no float formatting either way); the connection is kept alive, one per thread.

The client speaks the one HTTP/1.1 dialect the agent's server does (a request in one send, a
reply with a ``Content-Length``), over a plain socket: ``http.client`` sends the headers and
the body separately and parses the reply's headers with the ``email`` package, which together
cost more than the agent's own share of a request (~0.25 ms a call on the 2-core dev machine).
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from edge_agent.contracts.errors import EdgefleetError, RequestError, TransportError
from edge_agent.serving import codec

_SENDMSG = hasattr(socket.socket, "sendmsg")
#: Buffers handed to one sendmsg (Linux takes up to 1,024).
_MAX_IOV = 512
#: Request heads kept for reuse (one per model, input, dtype and shape sent).
_MAX_HEADS = 64
_MAX_HEAD_BYTES = 64 << 10
#: edge_agent.protocol.telemetry.WORKLOADS (not imported: this client needs only the stdlib)
_WORKLOADS = ("batch", "stream")


def _workload_header(workload: str | None) -> str:
    """The request header that counts a request under ``workload`` ("" for none)."""
    if workload is None:
        return ""
    if workload not in _WORKLOADS:
        raise ValueError(f"workload must be one of {_WORKLOADS}, not {workload!r}")
    return f"X-Edgefleet-Workload: {workload}\r\n"


class AgentError(EdgefleetError):
    """The agent answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}", reason=code, status=status)
        self.status = status


class _Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes | bytearray) -> None:
        self.status = status
        #: lower-cased names
        self.headers = headers
        self.body = body


class _ConnectionLost(Exception):
    """The agent closed a kept-alive connection before answering (it restarted, say)."""


class _Connection:
    """One kept-alive connection: a request out, its reply read by its Content-Length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def exchange(self, head: bytes, body: bytes | memoryview | list[memoryview]) -> _Reply:
        # Head and body in one send, without joining them (one segment on the wire); a body
        # in parts goes out part after part, never copied into one buffer.
        self._send([head, body] if isinstance(body, bytes | memoryview) else [head, *body])
        data = self._buf
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > _MAX_HEAD_BYTES:
                raise TransportError("the agent's reply headers are too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                if data:
                    raise TransportError("the agent closed the connection mid-reply")
                raise _ConnectionLost
            data += chunk
        lines = data[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise TransportError(f"not an HTTP reply from the agent: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "")
        if not length.isdigit():
            raise TransportError("the agent's reply has no Content-Length")
        start, size = end + 4, int(length)
        payload: bytes | bytearray = data[start : start + size]
        self._buf = data[start + size :]
        if len(payload) < size:  # the rest straight into one buffer, not grown chunk by chunk
            buf = bytearray(size)
            got = len(payload)
            buf[:got] = payload
            view = memoryview(buf)
            while got < size:
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise TransportError("the agent closed the connection mid-reply")
                got += n
            payload = buf
        if headers.get("connection", "").lower() == "close":
            self.close()
        return _Reply(int(parts[1]), headers, payload)

    def _send(self, pieces: list[bytes | memoryview]) -> None:
        for start in range(0, len(pieces), _MAX_IOV):
            group = pieces[start : start + _MAX_IOV]
            sent = self.sock.sendmsg(group) if _SENDMSG else 0
            for piece in group:  # what one sendmsg did not take, piece by piece
                size = len(piece)
                if sent >= size:
                    sent -= size
                    continue
                self.sock.sendall(memoryview(piece)[sent:])
                sent = 0

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self.sock.close()


class AgentClient:
    """``http://127.0.0.1:8651`` or ``unix:///var/lib/edgefleet/serving.sock``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8651", timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self._unix_path: str | None = None
        if parts.scheme == "unix" and parts.path:
            self._unix_path = parts.path
            self._host, self._port = "localhost", 0
            self._where = parts.path
        elif parts.scheme == "http" and parts.hostname:
            self._host = parts.hostname
            self._port = parts.port or 80
            self._where = f"{self._host}:{self._port}"
        else:
            raise ValueError(f"expected http://host:port or unix:///path, got {base_url!r}")
        self._host_header = f"Host: {self._host}\r\n"
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._heads: dict[tuple[str, str, np.dtype[Any], tuple[int, ...], str], bytes] = {}

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def _connect(self) -> _Connection:
        if self._unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout_s)
            try:
                sock.connect(self._unix_path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(sock)

    def _predict_path(self, model: str) -> str:
        return f"/v1/models/{quote(model, safe='')}:predict"

    def _head(self, method: str, path: str, headers: str, length: int) -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\n{self._host_header}{headers}"
            f"Content-Length: {length}\r\n\r\n"
        ).encode("latin-1")

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | memoryview = b"",
        headers: str = "",
    ) -> _Reply:
        return self._exchange(self._head(method, path, headers, len(body)), body)

    def _exchange(self, head: bytes, body: bytes | memoryview | list[memoryview]) -> _Reply:
        for attempt in (1, 2):
            conn: _Connection | None = getattr(self._local, "conn", None)
            reused = conn is not None and not conn.closed
            try:
                if conn is None or conn.closed:
                    conn = self._local.conn = self._connect()
                return conn.exchange(head, body)
            except (_ConnectionLost, OSError, TransportError) as e:
                if conn is not None:
                    conn.close()
                self._local.conn = None
                # A kept-alive connection the agent has closed (it restarted, say) fails at
                # once: try once more on a fresh one. Not after a timeout: the agent is busy.
                stale = isinstance(e, _ConnectionLost | ConnectionError)
                if not (reused and stale and attempt == 1):
                    if isinstance(e, TransportError):
                        raise
                    raise TransportError(f"agent at {self._where} unreachable: {e!r}") from e
        raise AssertionError("unreachable")

    @staticmethod
    def _raise_for(status: int, data: bytes | bytearray) -> None:
        try:
            err = json.loads(data)["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", data[:200].decode(errors="replace")
        if status == 400:
            raise RequestError(message, reason=code)
        raise AgentError(status, code, message)

    def predict(
        self, model: str, inputs: dict[str, np.ndarray], *, workload: str | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs by name. ``workload`` ("batch", "stream") counts the request in that
        workload's telemetry; :attr:`last_version` is the version that answered."""
        extra = _workload_header(workload)
        # One tensor travels raw (its bytes, dtype and shape in two headers: nothing to parse),
        # several as .npz (a zip, ~100 µs each way).
        if len(inputs) == 1:
            [(name, array)] = inputs.items()
            array = np.asarray(array)
            head = self._tensor_head(model, name, array.dtype, array.shape, extra)
            reply = self._exchange(head, codec.tensor_bytes(array))
        else:
            npz = codec.encode_npz(inputs)
            headers = f"Accept: {codec.TENSOR}, {codec.NPZ}\r\nContent-Type: {codec.NPZ}\r\n{extra}"
            reply = self._request("POST", self._predict_path(model), npz, headers)
        return self._outputs(reply)

    def predict_rows(
        self,
        model: str,
        name: str,
        parts: list[np.ndarray],
        *,
        workload: str | None = None,
    ) -> dict[str, np.ndarray]:
        """``predict(model, {name: np.concatenate(parts)})`` without the concatenation: the
        parts (of one dtype and the same trailing shape) go out one after another, as the
        rows of one tensor. A batch of files is not copied into one array first."""
        extra = _workload_header(workload)
        if not parts:
            raise ValueError("predict_rows needs at least one part")
        arrays = [np.asarray(p) for p in parts]
        first = arrays[0]
        if first.ndim == 0 or any(
            a.dtype != first.dtype or a.shape[1:] != first.shape[1:] for a in arrays
        ):
            raise ValueError("parts must share a dtype and their shape after the first axis")
        shape = (sum(a.shape[0] for a in arrays), *first.shape[1:])
        head = self._tensor_head(model, name, first.dtype, shape, extra)
        reply = self._exchange(head, [codec.tensor_bytes(a) for a in arrays])
        return self._outputs(reply)

    def _tensor_head(
        self, model: str, name: str, dtype: np.dtype[Any], shape: tuple[int, ...], extra: str
    ) -> bytes:
        """The request head for one raw tensor. Apps send the same shapes over and over: each
        head is made once."""
        key = (model, name, dtype, shape, extra)
        head = self._heads.get(key)
        if head is None:
            if not name.isprintable():
                raise ValueError(f"input name {name!r} cannot go in a header")
            if len(self._heads) >= _MAX_HEADS:
                self._heads.clear()
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            head = self._heads[key] = self._head(
                "POST",
                self._predict_path(model),
                f"Accept: {codec.TENSOR}, {codec.NPZ}\r\n"
                f"Content-Type: {codec.TENSOR}\r\nX-Edgefleet-Input: {name}\r\n{extra}"
                f"{codec.DTYPE_HEADER}: {codec.dtype_name(dtype)}\r\n"
                f"{codec.SHAPE_HEADER}: {','.join(map(str, shape))}\r\n",
                size,
            )
        return head

    def _outputs(self, reply: _Reply) -> dict[str, np.ndarray]:
        if reply.status != 200:
            self._raise_for(reply.status, reply.body)
        h = reply.headers
        self._local.request_id = h.get("x-edgefleet-request-id")
        self._local.version = h.get("x-edgefleet-version")
        if h.get("content-type", "").startswith(codec.TENSOR):
            name = h.get("x-edgefleet-output", "")
            return {
                name: codec.decode_tensor(
                    reply.body,
                    h.get(codec.DTYPE_HEADER.lower()),
                    h.get(codec.SHAPE_HEADER.lower()),
                    what=f"output {name!r}",
                )
            }
        return codec.decode_npz(reply.body)

    @property
    def last_request_id(self) -> str | None:
        """The request id of this thread's last answer (what a label names later)."""
        rid: str | None = getattr(self._local, "request_id", None)
        return rid

    @property
    def last_version(self) -> str | None:
        """The model version that gave this thread's last answer."""
        version: str | None = getattr(self._local, "version", None)
        return version

    def describe(self, model: str) -> dict[str, Any]:
        """What serves ``model`` (a slot or model name): version, inputs, outputs."""
        reply = self._request("GET", f"/v1/models/{quote(model, safe='')}")
        if reply.status != 200:
            self._raise_for(reply.status, reply.body)
        described: dict[str, Any] = json.loads(reply.body)
        return described

    def feedback(self, model: str, labels: list[tuple[str, int | list[int]]]) -> dict[str, int]:
        """Send labels for earlier answers: [(request id, class or classes per row)]. Returns
        ``{accepted, correct, late}``; refusals raise (RequestError / AgentError)."""
        body = json.dumps(
            {"feedback": [{"request_id": rid, "label": label} for rid, label in labels]}
        ).encode()
        reply = self._request(
            "POST",
            f"/v1/models/{quote(model, safe='')}:feedback",
            body,
            f"Content-Type: {codec.JSON}\r\n",
        )
        if reply.status != 200:
            self._raise_for(reply.status, reply.body)
        result: dict[str, int] = json.loads(reply.body)
        return result

    def models(self) -> list[dict[str, Any]]:
        reply = self._request("GET", "/v1/models")
        if reply.status != 200:
            self._raise_for(reply.status, reply.body)
        return list(json.loads(reply.body)["models"])

    def ready(self) -> bool:
        try:
            return self._request("GET", "/readyz").status == 200
        except TransportError:
            return False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
