"""A small Python client for the agent's local inference API (standard library only).

    from edge_agent.client import AgentClient
    client = AgentClient("http://127.0.0.1:8651")
    outputs = client.predict("classifier", {"x": batch})

A single tensor travels as raw bytes with its dtype and shape in headers, several as ``.npz``
(no float formatting either way); the connection is kept alive.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edge_agent import codec
from edge_agent.errors import EdgefleetError, RequestError, TransportError


class AgentError(EdgefleetError):
    """The agent answered with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}", reason=code, status=status)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """``http://127.0.0.1:8651`` or ``unix:///var/lib/edgefleet/serving.sock``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8651", timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self._unix_path: str | None = None
        if parts.scheme == "unix" and parts.path:
            self._unix_path = parts.path
            self._host, self._port = "localhost", 0
        elif parts.scheme == "http" and parts.hostname:
            self._host = parts.hostname
            self._port = parts.port or 80
        else:
            raise ValueError(f"expected http://host:port or unix:///path, got {base_url!r}")
        self._timeout_s = timeout_s
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._unix_path is not None:
                conn = _UnixConnection(self._unix_path, self._timeout_s)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
            self._local.conn = conn
        return conn

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, bytes, http.client.HTTPMessage]:
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheader("Content-Type", ""), data, resp.headers
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                # A kept-alive connection the agent closed: retry once on a fresh one.
                if attempt == 2:
                    raise TransportError(
                        f"agent at {self._host}:{self._port} unreachable: {e}"
                    ) from e
        raise AssertionError("unreachable")

    @staticmethod
    def _raise_for(status: int, data: bytes) -> None:
        try:
            err = json.loads(data)["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", data[:200].decode(errors="replace")
        if status == 400:
            raise RequestError(message, reason=code)
        raise AgentError(status, code, message)

    def predict(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # One tensor travels raw (its bytes, dtype and shape in two headers: nothing to parse),
        # several as .npz (a zip, ~100 µs each way).
        headers = {"Accept": f"{codec.TENSOR}, {codec.NPZ}"}
        if len(inputs) == 1:
            [(name, array)] = inputs.items()
            body, tensor_headers = codec.encode_tensor(np.asarray(array))
            headers.update(tensor_headers)
            headers.update({"Content-Type": codec.TENSOR, "X-Edgefleet-Input": name})
        else:
            body = codec.encode_npz(inputs)
            headers["Content-Type"] = codec.NPZ
        status, rtype, data, reply = self._request(
            "POST", f"/v1/models/{model}:predict", body, headers
        )
        if status != 200:
            self._raise_for(status, data)
        if rtype.startswith(codec.TENSOR):
            name = reply.get("X-Edgefleet-Output", "")
            return {
                name: codec.decode_tensor(
                    data,
                    reply.get(codec.DTYPE_HEADER),
                    reply.get(codec.SHAPE_HEADER),
                    what=f"output {name!r}",
                )
            }
        return codec.decode_npz(data)

    def models(self) -> list[dict[str, Any]]:
        status, _, data, _ = self._request("GET", "/v1/models")
        if status != 200:
            self._raise_for(status, data)
        return list(json.loads(data)["models"])

    def ready(self) -> bool:
        try:
            status, _, _, _ = self._request("GET", "/readyz")
        except TransportError:
            return False
        return status == 200

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
