"""The local inference API over HTTP/1.1 (TCP) and a Unix socket, in front of the slot table.

Routes: ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``GET /v1/models/{name}``,
``POST /v1/models/{name}:predict`` (encodings in :mod:`edge_agent.serving.codec`; the answer
carries ``X-Edgefleet-Request-Id``, and ``request_id`` in JSON; ``X-Edgefleet-Workload:
batch`` or ``stream`` counts the request in that workload's telemetry instead), ``POST
/v1/models/{name}:feedback`` (labels for earlier answers, :mod:`edge_agent.serving.feedback`).
Errors are JSON ``{"error": {"code", "message", "detail"}}``; a model that fails a request
answers 500.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import numpy as np

from edge_agent import __version__
from edge_agent.contracts.errors import ConfigError, EdgefleetError, RequestError
from edge_agent.protocol.telemetry import WORKLOADS
from edge_agent.serving import codec, metrics
from edge_agent.serving.feedback import parse_feedback
from edge_agent.serving.predict import predict
from edge_agent.serving.table import SlotTable

log = logging.getLogger(__name__)

#: Largest request body the local API accepts.
MAX_BODY_BYTES = 256 << 20
#: Largest feedback body (10,000 labels with their ids fit in well under 1 MiB).
MAX_FEEDBACK_BYTES = 4 << 20


#: Counts a predict request in a workload's telemetry (batch, stream) instead of online's.
WORKLOAD_HEADER = "X-Edgefleet-Workload"

#: Limits on a request's head, as the standard library's parser has them.
MAX_HEADERS = 100
MAX_HEADER_LINE = 65536


class _Headers(dict[str, str]):
    """A request's headers by lower-cased name (the one value of each)."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _Handler(BaseHTTPRequestHandler):
    """The local API. Request heads are read, and reply heads written, here rather than by
    ``BaseHTTPRequestHandler``: it parses headers with the ``email`` package and writes a reply
    head a header at a time, together ~90 µs a request here, more than the rest of the path."""

    server: InferenceHTTPServer | InferenceUnixServer
    raw_requestline: bytes
    protocol_version = "HTTP/1.1"
    server_version = f"edgefleet-agent/{__version__}"
    # A request line that cannot be read is answered with a status line (the stdlib's default,
    # HTTP/0.9, answers errors with a bare HTML page).
    default_request_version = "HTTP/1.0"
    # A buffered wfile: headers and body go out together when the request is done, instead of
    # the headers alone first (which, with Nagle and delayed ACKs, costs ~40 ms a response).
    wbufsize = 1 << 16

    def setup(self) -> None:
        super().setup()
        if self.request.family in (socket.AF_INET, socket.AF_INET6):
            # Small responses must not wait for the client's ACK of the previous segment.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def handle_expect_100(self) -> bool:
        ok = super().handle_expect_100()
        self.wfile.flush()  # buffered: the client waits for this before sending the body
        return ok

    def parse_request(self) -> bool:
        words = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n").split(" ")
        if not (
            len(words) == 3
            and words[2] in ("HTTP/1.1", "HTTP/1.0")
            and words[1].startswith("/")
            and not words[1].startswith("//")
        ):
            return super().parse_request()  # anything unusual: the stdlib's checks and errors
        self.requestline = " ".join(words)
        self.command, self.path, self.request_version = words
        self.close_connection = self.request_version != "HTTP/1.1"
        headers = _Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = str(line, "iso-8859-1").partition(":")
            key = name.lower()
            if not colon or not name or name != name.strip() or " " in name:
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad header line {line[:80]!r}")
                return False
            value = value.strip()
            if key == "content-length" and headers.get(key, value) != value:
                self.send_error(HTTPStatus.BAD_REQUEST, "Conflicting Content-Length headers")
                return False
            headers[key] = value
        else:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            return False
        self.headers = cast(Any, headers)
        connection = headers.get("connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        expect = headers.get("expect", "").lower()
        if expect == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    # --- responses -------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes | memoryview,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.log_request(status, len(body))
        head = (
            f"{self.protocol_version} {status} {HTTPStatus(status).phrase}\r\n"
            f"Server: {self.server_version}\r\nDate: {_http_date()}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            + ("Connection: close\r\n" if self.close_connection else "")
            + "\r\n"
        )
        self.wfile.write(head.encode("latin-1"))
        self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), codec.JSON, headers)

    def _error(self, status: int, code: str, message: str, detail: Any = None) -> None:
        self._json(status, {"error": {"code": code, "message": message, "detail": detail}})

    # --- routes ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        table = self.server.table
        if self.path == "/healthz":
            versions = {s: m.ref.version for s, m in table.snapshot().items()}
            self._json(200, {"status": "ok", "slots": versions})
        elif self.path == "/readyz":
            models = {s: m.ref.version for s, m in table.snapshot().items()}
            self._json(200 if models else 503, {"ready": bool(models), "slots": models})
        elif self.path == "/metrics":
            self._send(200, metrics.render(table), metrics.CONTENT_TYPE)
        elif self.path == "/v1/models":
            self._json(
                200,
                {"models": [{"slot": s, **m.describe()} for s, m in table.snapshot().items()]},
            )
        elif self.path.startswith("/v1/models/"):
            name = self.path[len("/v1/models/") :]
            slot = table.resolve(name)
            snap = table.snapshot()
            if slot is None or slot not in snap:
                self._error(404, "model_not_found", f"no model or slot named {name!r} is serving")
            else:
                self._json(200, {"slot": slot, **snap[slot].describe()})
        else:
            self._error(404, "not_found", f"no route {self.path}")

    def do_POST(self) -> None:
        prefix = "/v1/models/"
        suffix = next((s for s in (":predict", ":feedback") if self.path.endswith(s)), None)
        if not self.path.startswith(prefix) or suffix is None:
            self._error(404, "not_found", f"no route {self.path}")
            return
        name = self.path[len(prefix) : -len(suffix)]
        limit = MAX_BODY_BYTES if suffix == ":predict" else MAX_FEEDBACK_BYTES
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # whatever body follows cannot be skipped
            self._error(411, "length_required", "send a Content-Length header")
            return
        if int(length) > limit:
            self.close_connection = True
            self._error(413, "too_large", f"request body over {limit} bytes")
            return
        body = self.rfile.read(int(length))
        if suffix == ":feedback":
            self._feedback(name, body)
            return
        content_type = (self.headers.get("Content-Type") or codec.JSON).split(";")[0].strip()
        workload = self.headers.get(WORKLOAD_HEADER)
        if workload is not None and workload not in WORKLOADS:
            self._error(
                400,
                "bad_workload",
                f"{WORKLOAD_HEADER} must be one of {', '.join(WORKLOADS)}, not {workload[:40]!r}",
            )
            return
        try:
            feeds, out_encoding = self._decode(name, body, content_type)
            result = predict(self.server.table, name, feeds, workload)
        except LookupError:
            self._error(404, "model_not_found", f"no model or slot named {name!r} is serving")
            return
        except RequestError as e:
            self._error(400, e.reason, e.message)
            return
        except EdgefleetError as e:  # RuntimeBackendError: the model failed, and was counted
            self._error(500, e.reason, e.message)
            return
        except Exception as e:  # a bug of ours: answer it, keep the connection and the server
            log.exception("predict on %s failed unexpectedly", name)
            self._error(500, "internal_error", f"{type(e).__name__}: {e}")
            return
        headers = {
            "X-Edgefleet-Model": result.ref.model,
            "X-Edgefleet-Version": result.ref.version,
            "X-Edgefleet-Latency-Ms": f"{result.latency_ms:.3f}",
        }
        if result.request_id is not None:
            headers["X-Edgefleet-Request-Id"] = result.request_id
        accept = self.headers.get("Accept", "")
        if codec.TENSOR in accept and len(result.outputs) == 1:
            [(out_name, out)] = result.outputs.items()
            raw, tensor_headers = codec.encode_tensor(out)
            headers.update(tensor_headers)
            headers["X-Edgefleet-Output"] = out_name
            self._send(200, raw, codec.TENSOR, headers)
        elif codec.NPY in accept and len(result.outputs) == 1:
            [(out_name, out)] = result.outputs.items()
            headers["X-Edgefleet-Output"] = out_name
            self._send(200, codec.encode_npy(out), codec.NPY, headers)
        elif codec.NPZ in accept or (content_type == codec.NPZ and codec.JSON not in accept):
            self._send(200, codec.encode_npz(result.outputs), codec.NPZ, headers)
        else:
            answer: dict[str, Any] = {
                "model": result.ref.model,
                "version": result.ref.version,
                "outputs": {
                    k: codec.encode_json_value(v, out_encoding) for k, v in result.outputs.items()
                },
            }
            if result.request_id is not None:
                answer["request_id"] = result.request_id
            self._json(200, answer, headers)

    def _feedback(self, name: str, body: bytes) -> None:
        """Labels for earlier answers: checked whole, counted, made durable, then answered."""
        table = self.server.table
        store = table.feedback
        if store is None:
            self._error(404, "feedback_off", "this agent keeps no predictions for labels")
            return
        slot = table.resolve(name)
        serving = table.snapshot().get(slot) if slot is not None else None
        if slot is None or serving is None:
            self._error(404, "model_not_found", f"no model or slot named {name!r} is serving")
            return
        if serving.classes is None:
            self._error(
                422,
                "no_class_output",
                f"{serving.ref.model} {serving.ref.version} has no class output to label "
                "(labels are class indices of a classifier-like output)",
            )
            return
        try:
            labels = parse_feedback(json.loads(body))
        except ValueError as e:  # JSONDecodeError is one
            self._error(400, "bad_json", f"feedback is not JSON: {e}")
            return
        except RequestError as e:
            self._error(422, e.reason, e.message)
            return
        try:
            verdict = store.label(slot, serving.ref, labels, serving.classes[1])
        except RequestError as e:
            if e.reason == "too_many_labels":
                self._json(
                    429,
                    {"error": {"code": e.reason, "message": e.message, "detail": None}},
                    {"Retry-After": "1"},
                )
            else:
                self._error(422, e.reason, e.message)
            return
        try:
            store.persist()
        except OSError as e:
            log.error("feedback counted but not yet durable: %s", e)
            self._error(503, "not_durable", f"labels counted, not yet on disk: {e}")
            return
        self._json(200, verdict.to_json())

    def _decode(
        self, name: str, body: bytes, content_type: str
    ) -> tuple[dict[str, np.ndarray], str]:
        if content_type == codec.NPZ:
            return codec.decode_npz(body), "list"
        if content_type == codec.TENSOR:
            input_name = self._single_input(name, "a raw tensor")
            arr = codec.decode_tensor(
                body,
                self.headers.get(codec.DTYPE_HEADER),
                self.headers.get(codec.SHAPE_HEADER),
                what=f"input {input_name!r}",
            )
            return {input_name: arr}, "list"
        if content_type in (codec.NPY, "application/octet-stream"):
            arr = codec.decode_npy(body)
            return {self._single_input(name, "a .npy"): arr}, "list"
        if content_type != codec.JSON:
            raise RequestError(f"unsupported Content-Type {content_type!r}", reason="content_type")
        return codec.decode_json_body(body)

    def _single_input(self, model: str, encoding: str) -> str:
        """The input a one-tensor body is for: ``X-Edgefleet-Input``, or the model's only one."""
        named = self.headers.get("X-Edgefleet-Input")
        if named:
            return named
        with self.server.table.use(model) as serving:
            names = [s.name for s in serving.manifest.inputs]
        if len(names) != 1:
            raise RequestError(
                f"{encoding} body without X-Edgefleet-Input fits single-input models; "
                f"this one has inputs {names}",
                reason="input_encoding",
            )
        return names[0]


class _UnixHandler(_Handler):
    def address_string(self) -> str:
        return "unix"


def claim_unix_path(path: Path, what: str) -> str:
    """``path`` ready for a Unix socket to bind (a socket left by a crash removed), or a
    ConfigError naming ``what`` when the path is longer than a socket address holds."""
    if len(str(path).encode()) > 100:
        raise ConfigError(
            f"{what} path is too long for a Unix socket ({path}); use a shorter one, e.g. "
            "/run/edgefleet/serving.sock"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return str(path)


class InferenceUnixServer(socketserver.ThreadingUnixStreamServer):
    """The same API on a Unix socket: no TCP stack, and access controlled by file mode."""

    daemon_threads = True

    def __init__(self, path: Path, table: SlotTable) -> None:
        self.table = table
        self.path = path
        super().__init__(claim_unix_path(path, "serving.unix_socket"), _UnixHandler)
        path.chmod(0o660)

    def server_close(self) -> None:
        super().server_close()
        self.path.unlink(missing_ok=True)


def start_unix(table: SlotTable, path: Path) -> InferenceUnixServer:
    server = InferenceUnixServer(path, table)
    threading.Thread(target=server.serve_forever, name="edge-agent-unix", daemon=True).start()
    return server


class InferenceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], table: SlotTable) -> None:
        self.table = table
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def start_http(
    table: SlotTable, host: str, port: int
) -> tuple[InferenceHTTPServer, threading.Thread]:
    server = InferenceHTTPServer((host, port), table)
    thread = threading.Thread(target=server.serve_forever, name="edge-agent-http", daemon=True)
    thread.start()
    return server, thread
