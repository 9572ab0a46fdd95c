"""The runner's TCP relay between a rig's agents and the fleet server (HTTP and MQTT).

Every rig device reaches the server through a relay the runner owns, so a scenario can act on
the path the way the real world does, on any rig kind:

- ``cut()`` / ``restore()``: the link goes down (open connections are dropped, new ones are
  refused) and comes back. On a ``netns`` rig the veth link itself is cut; the relay is how a
  ``local`` rig, which has no link of its own, loses its network.
- ``shape(bytes_per_s, delay_s)``: a slow link (a token bucket per direction and a delay per
  chunk). ``netns`` rigs shape the veth with ``tc`` instead.
- ``tamper_bundles = True``: an attacker in the path flips one byte of every bundle body served
  (``GET /v1/bundles/…``); the agent must refuse it by its digest.

The relay listens on ``listen_host`` (loopback for local agents; the host end of the veth pair
for namespaced ones), one port per upstream, and runs on one asyncio loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Relay"]

CHUNK = 16 * 1024
#: The longest the relay waits for the device to acknowledge what it was sent before a
#: progress callback fires.
DRAIN_S = 5.0


async def _acknowledged(writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """Until every byte written to the peer has been acknowledged by it (Linux: the socket's
    send queue, SIOCOUTQ, is empty), or ``timeout_s``."""
    await writer.drain()
    sock = writer.get_extra_info("socket")
    deadline = time.monotonic() + timeout_s
    while sock is not None and time.monotonic() < deadline:
        try:
            unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
        except OSError:
            return
        if unacked[0] == 0:
            return
        await asyncio.sleep(0.01)


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
#: The body byte a tampering relay flips (past the tar's first header block: the manifest).
TAMPER_OFFSET = 700


@dataclass
class _Shape:
    bytes_per_s: float | None = None
    delay_s: float = 0.0


class _Bucket:
    def __init__(self) -> None:
        self.tokens = 0.0
        self.at = time.monotonic()

    async def take(self, n: int, rate: float) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(rate, self.tokens + (now - self.at) * rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / rate)


class Relay:
    def __init__(self, listen_host: str = "127.0.0.1") -> None:
        self.listen_host = listen_host
        self.tamper_bundles = False
        #: (share, callback): called once, from the relay's thread, when a bundle body has
        #: passed that share of its Content-Length and the device has acknowledged that part
        #: (a fault injected mid-download).
        self.on_bundle_progress: tuple[float, Callable[[], None]] | None = None
        #: Bundle bodies the relay changed (evidence for the scenario).
        self.tampered = 0
        self._up = True
        self._shape = _Shape()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="hil-relay", daemon=True
        )
        self._servers: list[asyncio.base_events.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()

    def forward(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> int:
        """Listen on ``listen_host`` and forward to the upstream; returns the port."""

        async def open_server() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._serve(r, w, upstream_host, upstream_port),
                self.listen_host,
                listen_port,
            )
            self._servers.append(server)
            port: int = server.sockets[0].getsockname()[1]
            return port

        return asyncio.run_coroutine_threadsafe(open_server(), self._loop).result(10)

    # --- the scenario's handles -------------------------------------------------------------------
    def cut(self) -> None:
        self._up = False

        def drop() -> None:
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(drop)

    def restore(self) -> None:
        self._up = True

    def shape(self, bytes_per_s: float | None, delay_s: float = 0.0) -> None:
        self._shape = _Shape(bytes_per_s, delay_s)

    def unshape(self) -> None:
        self._shape = _Shape()

    def close(self) -> None:
        async def shut() -> None:
            for s in self._servers:
                s.close()
            for w in list(self._writers):
                w.transport.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- the relay --------------------------------------------------------------------------------
    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        if not self._up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        bundle_request = asyncio.Event()
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, bundle_request, upstream=True),
                self._pump(up_reader, writer, bundle_request, upstream=False),
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        bundle_request: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        bucket = _Bucket()
        body_seen = -1  # bytes of the current response body passed (downstream, tampering)
        body_length, body_passed = 0, 0  # the bundle response being watched for progress
        try:
            while self._up:
                data = await reader.read(CHUNK)
                if not data or not self._up:
                    break
                if upstream and b"GET /v1/bundles/" in data and b"/manifest" not in data:
                    bundle_request.set()
                if not upstream and self.tamper_bundles and bundle_request.is_set():
                    data, body_seen = self._tamper(data, body_seen)
                if not upstream and bundle_request.is_set() and self.on_bundle_progress:
                    start = 0  # where this chunk's body bytes begin
                    if not body_length and (m := CONTENT_LENGTH.search(data)):
                        body_length = int(m.group(1))
                        start = data.find(b"\r\n\r\n") + 4
                    share, callback = self.on_bundle_progress
                    # The device is cut off at exactly this body byte, at least two of its
                    # reads in (16 KiB each): a read that is still short when the link goes
                    # returns nothing, and the device would hold nothing to resume from.
                    at = min(body_length - 1, max(int(share * body_length), 2 * CHUNK))
                    end = body_passed + len(data) - start
                    if body_length and end >= at:
                        split = start + (at - body_passed)
                        self.on_bundle_progress = None
                        writer.write(data[:split])
                        # Hold the rest until the device has acknowledged what it was sent:
                        # a link cut drops what is still queued on this side.
                        await _acknowledged(writer, DRAIN_S)
                        callback()
                        if not self._up:
                            break
                        data = data[split:]
                    body_passed = end
                shape = self._shape
                if shape.delay_s:
                    await asyncio.sleep(shape.delay_s)
                if shape.bytes_per_s:
                    for i in range(0, len(data), 1024):
                        part = data[i : i + 1024]
                        await bucket.take(len(part), shape.bytes_per_s)
                        writer.write(part)
                        await writer.drain()
                else:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def _tamper(self, data: bytes, body_seen: int) -> tuple[bytes, int]:
        if body_seen < 0:
            end = data.find(b"\r\n\r\n")
            if end < 0 or not data.startswith(b"HTTP/1.1 2"):
                return data, body_seen
            head, body_start = data[: end + 4], end + 4
            body_seen = 0
            rest = bytearray(data[body_start:])
        else:
            head, rest = b"", bytearray(data)
        at = TAMPER_OFFSET - body_seen
        if 0 <= at < len(rest):
            rest[at] ^= 0xFF
            self.tampered += 1
        return head + bytes(rest), body_seen + len(rest)
