"""Streaming: score a local stream's messages as they arrive and hand the predictions on.

A stream (``[[streams]]`` in ``agent.toml``) reads messages from a topic on the device's own
MQTT broker (``mqtt://host:port/topic``) or from newline-delimited frames written to a Unix
socket the agent listens on (``unix:///path``), scores each one on the model its slot serves
(the same slot table, hot-swap and rollback as the request path, counted under the ``stream``
telemetry role), and publishes the prediction to an output topic, or writes it back on the
connection the frame came from.

A message is JSON: ``{"id": "frame-17", "inputs": {"x": [[...]]}}``, an input as a nested
list or as ``{"b64", "dtype", "shape"}`` (see :mod:`edge_agent.serving.codec`). The answer:
``{"id", "model", "version", "latency_ms", "outputs": {...}}``, or ``{"id", "error": {"code",
"message"}}`` for a message that is not valid or that the model failed: every message that is
scored gets exactly one answer, whichever version serves at that moment.

Back-pressure is bounded: messages wait in a queue of ``queue`` entries; when it is full the
oldest waiting message is dropped and counted (a stream's consumer wants the newest frame, not
a growing delay). Counters per stream — received, answered, invalid, failed, dropped — are on
the agent's ``/metrics``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edge_agent.contracts.endpoints import mqtt_endpoint
from edge_agent.contracts.errors import EdgefleetError, RequestError
from edge_agent.serving import codec
from edge_agent.serving.http import claim_unix_path
from edge_agent.serving.predict import predict
from edge_agent.serving.table import SlotTable

__all__ = ["MAX_MESSAGE_BYTES", "Stream", "StreamCollector", "StreamCounters", "StreamSpec"]

log = logging.getLogger(__name__)

#: Largest message a stream takes (a 1080p RGB frame as base64 fits).
MAX_MESSAGE_BYTES = 16 << 20
MAX_ID = 128
#: A stream logs at most one warning about bad messages this often.
WARN_EVERY_S = 10.0

Reply = Callable[[bytes], None]


@dataclass(frozen=True)
class StreamSpec:
    """One stream of ``agent.toml`` (checked by ``edge_agent.config.StreamConfig``)."""

    name: str
    slot: str
    input: str
    output: str | None
    queue: int = 1000
    qos: int = 0
    #: For ``mqtt://`` ends: the broker's user name and password (the device's own broker).
    username: str | None = None
    password: str | None = None


@dataclass
class StreamCounters:
    received: int = 0
    answered: int = 0
    invalid: int = 0
    failed: int = 0
    dropped: int = 0


class Stream:
    """One stream: its source, its bounded queue, one scoring thread, its sink."""

    def __init__(self, spec: StreamSpec, table: SlotTable) -> None:
        self.spec = spec
        self.table = table
        self.counters = StreamCounters()
        self._queue: collections.deque[tuple[bytes, Reply | None, float]] = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._stopping = False
        self._worker = threading.Thread(
            target=self._work, name=f"edge-agent-stream-{spec.name}", daemon=True
        )
        self._ids = itertools.count(1)
        self._last_warning = 0.0
        self._source: _MqttEnd | _UnixSource | None = None
        self._sink: _MqttEnd | None = None
        self._topic_out = ""

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        spec = self.spec
        source = mqtt_endpoint(spec.input) if spec.input.startswith("mqtt:") else None
        out = mqtt_endpoint(spec.output) if spec.output is not None else None
        if out is not None:
            self._topic_out = out[2]
            if source is None or source[:2] != out[:2]:
                self._sink = _MqttEnd(spec, out, client_suffix="out")
        if source is not None:
            self._source = _MqttEnd(spec, source, client_suffix="in", on_message=self.offer)
            if out is not None and self._sink is None:
                self._sink = self._source  # one connection for both ends
        else:
            self._source = _UnixSource(Path(urlsplit(spec.input).path), self.offer)
        self._worker.start()
        if self._sink is not None and self._sink is not self._source:
            self._sink.start()
        self._source.start()
        log.info(
            "stream %s: %s → %s → %s",
            spec.name,
            spec.input,
            spec.slot,
            spec.output or "the connection each frame came on",
        )

    def stop(self) -> None:
        """No new message is taken; what is queued is answered; then the ends close."""
        if isinstance(self._source, _UnixSource):
            self._source.stop()
        elif self._source is not None:
            self._source.pause()  # its connection may be the sink: it stays open until the end
        with self._lock:
            self._stopping = True
            self._ready.notify_all()
        self._worker.join(timeout=30)
        for end in {
            id(e): e for e in (self._source, self._sink) if isinstance(e, _MqttEnd)
        }.values():
            end.stop()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """The MQTT ends are connected and subscribed (a Unix source is at once)."""
        ends = [e for e in (self._source, self._sink) if isinstance(e, _MqttEnd)]
        return all(e.ready.wait(timeout_s) for e in ends)

    # --- the queue ----------------------------------------------------------------------------
    def offer(self, payload: bytes, reply: Reply | None = None) -> None:
        """A message arrived (a network thread): queue it, dropping the oldest when full."""
        with self._lock:
            self.counters.received += 1
            if self._stopping:  # a frame on a connection still open while the agent stops
                self.counters.dropped += 1
                return
            if len(self._queue) >= self.spec.queue:
                self._queue.popleft()
                self.counters.dropped += 1
            self._queue.append((payload, reply, time.monotonic()))
            self._ready.notify()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    return  # stopping, and everything queued was answered
                payload, reply, _ = self._queue.popleft()
            try:
                answer = self._score(payload)
            except Exception:  # a bug of ours must not end the stream
                log.exception("stream %s: scoring a message failed unexpectedly", self.spec.name)
                answer = _error(None, "internal_error", "the agent failed this message")
            self._emit(answer, reply)

    def _score(self, payload: bytes) -> bytes:
        spec = self.spec
        msg_id: Any = None
        try:
            doc = _document(payload)
            msg_id = _message_id(doc)
            if msg_id is None:
                msg_id = f"{spec.name}-{next(self._ids)}"
            feeds, encoding = _feeds(doc)
            result = predict(self.table, spec.slot, feeds, "stream")
        except RequestError as e:
            self._count("invalid", f"message {msg_id!r}: {e.message}")
            return _error(msg_id, e.reason, e.message)
        except LookupError:
            self._count("failed", f"no model serves {spec.slot!r}")
            return _error(msg_id, "model_not_found", f"no model or slot named {spec.slot!r}")
        except EdgefleetError as e:  # the model failed it (counted in its figures)
            self._count("failed", f"message {msg_id!r}: {e.message}")
            return _error(msg_id, e.reason, e.message)
        with self._lock:
            self.counters.answered += 1
        return json.dumps(
            {
                "id": msg_id,
                "model": result.ref.model,
                "version": result.ref.version,
                "latency_ms": round(result.latency_ms, 3),
                "outputs": {
                    k: codec.encode_json_value(v, encoding) for k, v in result.outputs.items()
                },
            }
        ).encode()

    def _count(self, what: str, message: str) -> None:
        with self._lock:
            setattr(self.counters, what, getattr(self.counters, what) + 1)
            now = time.monotonic()
            warn = now - self._last_warning >= WARN_EVERY_S
            if warn:
                self._last_warning = now
        if warn:
            log.warning("stream %s: %s %s (counted; warnings at most every %.0f s)",
                        self.spec.name, what, message, WARN_EVERY_S)  # fmt: skip

    def _emit(self, answer: bytes, reply: Reply | None) -> None:
        if self._sink is not None:
            self._sink.publish(self._topic_out, answer)
        elif reply is not None:
            reply(answer)


def _document(payload: bytes) -> dict[str, Any]:
    """A message's JSON object; RequestError names what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise RequestError(
            f"message of {len(payload)} bytes (limit {MAX_MESSAGE_BYTES})", reason="too_large"
        )
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"not valid JSON: {e}", reason="input_encoding") from e
    if not isinstance(doc, dict):
        raise RequestError('a message is {"id": …, "inputs": {…}}', reason="input_encoding")
    return doc


def _message_id(doc: dict[str, Any]) -> Any:
    msg_id = doc.get("id")
    if msg_id is not None and not (
        isinstance(msg_id, int | str)
        and not isinstance(msg_id, bool)
        and len(str(msg_id)) <= MAX_ID
    ):
        raise RequestError(
            f"id must be a string or a number of at most {MAX_ID} characters", reason="bad_id"
        )
    return msg_id


def _feeds(doc: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
    """(feeds, output encoding) of a message."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise RequestError('a message is {"id": …, "inputs": {…}}', reason="input_encoding")
    encoding = doc.get("output_encoding", "list")
    if encoding not in ("list", "b64"):
        raise RequestError("output_encoding must be 'list' or 'b64'", reason="input_encoding")
    feeds = {str(k): codec.decode_json_value(str(k), v) for k, v in inputs.items()}
    return feeds, encoding


def _error(msg_id: Any, code: str, message: str) -> bytes:
    return json.dumps({"id": msg_id, "error": {"code": code, "message": message}}).encode()


class _MqttEnd:
    """A connection to the device's own broker: the source's subscription and/or the sink."""

    def __init__(
        self,
        spec: StreamSpec,
        endpoint: tuple[str, int, str],
        *,
        client_suffix: str,
        on_message: Callable[[bytes], None] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._qos = spec.qos
        self._host, self._port, self._topic = endpoint
        self._deliver = on_message
        self.ready = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            # Unique per connection: two agents (or two of a stream's ends) never take over
            # each other's session.
            client_id=f"edgefleet-stream-{spec.name[:24]}-{client_suffix}-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        if spec.username:
            self._client.username_pw_set(spec.username, spec.password)
        # Publishes wait in paho's queue while the broker is away; bounded like the stream.
        self._client.max_queued_messages_set(max(spec.queue, 1000))
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *_: self.ready.clear()
        self._accepting = True
        self._last: Any = None  # the last publish's MQTTMessageInfo
        if on_message is not None:
            self._client.on_message = lambda _c, _u, m: (
                on_message(bytes(m.payload)) if self._accepting else None
            )

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def pause(self) -> None:
        """Take no more messages (the connection stays, for the answers still to go out)."""
        self._accepting = False
        if self._deliver is not None:
            self._client.unsubscribe(self._topic)

    def stop(self, flush_s: float = 10.0) -> None:
        """Close, once what was published has gone out (at QoS 1: once the broker has it)."""
        last = self._last
        if last is not None and self.ready.is_set():
            # Answers go out in order: the last is enough. A connection gone meanwhile raises.
            with contextlib.suppress(RuntimeError, ValueError):
                last.wait_for_publish(flush_s)
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        self._last = self._client.publish(topic, payload, qos=self._qos)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("stream broker %s:%d refused the connection: %s", self._host, self._port,
                      reason)  # fmt: skip
            return
        # An answer goes out right after the PUBACK of its message: with Nagle's algorithm
        # it would wait for the broker's (delayed) ACK of that PUBACK, ~10 ms here.
        sock = client.socket()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._deliver is None:
            self.ready.set()
            return
        client.on_subscribe = lambda *_: self.ready.set()
        client.subscribe(self._topic, qos=self._qos)


class _UnixSource:
    """Frames, one per line, on connections to a Unix socket the agent listens on; each
    answer goes back on the connection its frame came from, one line each."""

    def __init__(self, path: Path, offer: Callable[[bytes, Reply | None], None]) -> None:
        self.path = path
        offer_frame = offer

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                lock = threading.Lock()
                wfile = self.wfile

                def reply(answer: bytes) -> None:
                    # A writer that went away leaves its answers nowhere to go (it was answered,
                    # and counted so; the connection is gone).
                    with lock, contextlib.suppress(OSError):
                        wfile.write(answer + b"\n")
                        wfile.flush()

                while True:
                    line = self.rfile.readline(MAX_MESSAGE_BYTES + 1)
                    if not line:
                        return
                    if len(line) > MAX_MESSAGE_BYTES:
                        offer_frame(line, reply)  # answered "too_large", counted as invalid
                        while line and not line.endswith(b"\n"):  # skip to the next frame
                            line = self.rfile.readline(MAX_MESSAGE_BYTES + 1)
                        continue
                    if line.strip():
                        offer_frame(line, reply)

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self._server = Server(claim_unix_path(path, "stream socket"), Handler)
        path.chmod(0o660)

    def start(self) -> None:
        threading.Thread(
            target=self._server.serve_forever, name="edge-agent-stream-unix", daemon=True
        ).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


class StreamCollector:
    """The streams' counters on the agent's local ``/metrics``."""

    def __init__(self, streams: list[Stream]) -> None:
        self._streams = streams

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {
            name: CounterMetricFamily(
                f"edgefleet_agent_stream_{name}", help_text, labels=["stream", "slot"]
            )
            for name, help_text in (
                ("received", "Messages a stream received"),
                ("answered", "Messages scored and answered"),
                ("invalid", "Messages that were not valid (answered with an error)"),
                ("failed", "Messages the model failed (answered with an error)"),
                ("dropped", "Messages dropped unanswered: the stream's queue was full"),
            )
        }
        waiting = GaugeMetricFamily(
            "edgefleet_agent_stream_waiting", "Messages waiting in the queue", labels=["stream"]
        )
        for stream in self._streams:
            c = stream.counters
            for name, family in families.items():
                family.add_metric([stream.spec.name, stream.spec.slot], getattr(c, name))
            waiting.add_metric([stream.spec.name], stream.waiting)
        return [*families.values(), waiting]
