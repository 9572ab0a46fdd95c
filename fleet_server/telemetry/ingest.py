"""Telemetry ingest: a ``$share/`` subscriber that stores batches and acknowledges them.

Each server process (``edgefleet serve``, or ``edgefleet telemetry ingest`` for more) runs one
``TelemetryIngest``; the broker hands every batch to one member of the share group, so
processes split the load. The API server ingests over its control plane's connection (a broker
that makes the client id the identity's name allows one connection per identity); a separate
ingest process opens an :class:`IngestConnection`. The MQTT callback only enqueues; one writer
thread drains up to ``max_batch`` messages (or what arrived within ``linger_s``) and stores
them in one transaction, then publishes each touched stream's watermark on the device's
``ack`` topic.

Members connect with a clean session and no session expiry: a member that goes away must not
hoard the group's messages in a persistent session (Debian's mosquitto 2.0.11 keeps
round-robining to an offline member). What the broker drops is not lost: the device resends
every batch until an acknowledgement covers it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session

from edge_agent.protocol.telemetry import ACK_QOS, TelemetryAck
from edge_agent.protocol.topics import Topics
from fleet_server.control.connection import TlsFiles, server_client
from fleet_server.telemetry.catalog import BundleCatalog
from fleet_server.telemetry.store import Outcome, prune_keys, store_batches

__all__ = ["SHARE_GROUP", "IngestConnection", "IngestCounters", "TelemetryIngest"]

log = logging.getLogger(__name__)

SHARE_GROUP = "edgefleet-telemetry"
#: Batch keys a watermark covers are deleted once this old, checked this often: the
#: de-duplication table holds hours of batches, not the fleet's whole history.
PRUNE_AFTER_S = 3600.0
PRUNE_EVERY_S = 600.0
#: A drain's linger is slept in this many steps (a full drain is stored sooner).
LINGER_STEPS = 4
SHARED_FILTER = Topics.shared(SHARE_GROUP, "telemetry")


class IngestCounters:
    """Prometheus counters of one ingest process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "edgefleet_telemetry_rejected",
            "Telemetry batches refused, by reason (never stored)",
            ["reason"],
            registry=registry,
        )
        self.batches = Counter(
            "edgefleet_telemetry_batches",
            "Telemetry batches received, by outcome (stored / duplicate)",
            ["outcome"],
            registry=registry,
        )


class IngestConnection:
    """An MQTT connection of its own for an ingest process that is not the API server
    (``edgefleet telemetry ingest``): a clean session, the ``$share/`` subscription."""

    def __init__(
        self,
        mqtt_url: str,
        on_message: Callable[[str, bytes], None],
        *,
        tls: TlsFiles = (None, None, None),
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self._client, self._host, self._port = server_client(
            mqtt_url, "ingest", tls=tls, credentials=credentials
        )
        self._deliver = on_message
        self.connected = threading.Event()
        #: The broker granted the shared subscription (messages flow from now on).
        self.subscribed = threading.Event()
        self._stopping = False
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self.subscribed.set()

    def start(self, wait_s: float = 10.0) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self.connected.wait(wait_s):
            log.warning("telemetry ingest: broker not reachable yet; will keep trying")

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        """A telemetry acknowledgement, at QoS 0 (see :data:`ACK_QOS`)."""
        self._client.publish(topic, payload, qos=ACK_QOS)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the telemetry ingest connection: %s", reason)
            return
        client.subscribe(SHARED_FILTER, qos=1)
        self.connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        if not self._stopping:
            log.warning("telemetry ingest disconnected: %s", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._deliver(message.topic, bytes(message.payload))


class TelemetryIngest:
    """Stores what it is offered (``offer``, from any MQTT connection's callback) and
    publishes acknowledgements through ``publish`` (topic, payload; QoS 1)."""

    def __init__(
        self,
        engine: Engine,
        bundles: BundleCatalog,
        counters: IngestCounters,
        *,
        publish: Callable[[str, bytes], None],
        bucket_s: int = 60,
        max_batch: int = 500,
        linger_s: float = 0.02,
        on_stored: Callable[[Outcome], None] | None = None,
    ) -> None:
        self._engine = engine
        self._bundles = bundles
        self.counters = counters
        self._publish = publish
        self._bucket_s = bucket_s
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._on_stored = on_stored
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.stored_total = 0
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        self._worker = threading.Thread(target=self._work, name="edgefleet-telemetry", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._worker.join(timeout=30)

    def offer(self, topic: str, payload: bytes) -> None:
        """Called on an MQTT network thread: only enqueues."""
        self._inbox.put((topic, payload))

    # --- the writer ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            drained = [first]
            deadline = time.monotonic() + self._linger_s
            # The linger is slept in a few steps, and what came in meanwhile is taken without
            # waiting: waiting on the queue for each batch woke this thread once a batch (a
            # lock handoff and a GIL switch each, ~5 % of an ingest process's CPU).
            while len(drained) < self._max_batch:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(left, self._linger_s / LINGER_STEPS))
                    continue
                if item is None:
                    self._store(drained)
                    return
                drained.append(item)
            self._store(drained)

    def _store(self, messages: list[tuple[str, bytes]]) -> None:
        for attempt in range(5):
            try:
                with Session(self._engine) as session:
                    outcome = store_batches(
                        session, messages, self._bundles, bucket_s=self._bucket_s
                    )
                break
            except (OperationalError, IntegrityError, DBAPIError) as e:
                # SQLite busy, a serialization failure: the transaction rolled back whole.
                log.warning("telemetry store attempt %d failed (%s); retrying", attempt + 1, e)
                time.sleep(0.05 * 2**attempt)
            except Exception:
                if len(messages) > 1:
                    # A fault of ours that one batch sets off must not cost the rest of the
                    # drain (resent, it would again): each is stored on its own.
                    log.exception(
                        "telemetry ingest failed on a drain of %d; storing them one by one",
                        len(messages),
                    )
                    for message in messages:
                        self._store([message])
                    return
                log.exception("telemetry ingest failed on the batch on %s", messages[0][0])
                self.counters.rejected.labels("internal_error").inc()
                return
        else:
            log.error("telemetry: %d message(s) not stored; devices will resend", len(messages))
            return
        for rejection in outcome.rejected:
            self.counters.rejected.labels(rejection.reason).inc()
            log.warning(
                "telemetry from %s refused (%s): %s",
                rejection.device_id or "?",
                rejection.reason,
                rejection.message,
            )
        if any(r.reason == "unknown_bundle" for r in outcome.rejected):
            self._bundles.forget_unknown()
        self.counters.batches.labels("stored").inc(outcome.stored)
        self.counters.batches.labels("duplicate").inc(outcome.duplicates)
        self.stored_total += outcome.stored
        for (device_id, stream), acked in outcome.acks.items():
            ack = TelemetryAck(stream=stream, acked_seq=acked)
            self._publish(Topics(device_id).ack, ack.to_bytes())
        if self._on_stored is not None and outcome.touched:
            try:
                self._on_stored(outcome)
            except Exception:
                log.exception("after-store hook failed")
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            self.prune()

    def prune(self, after_s: float = PRUNE_AFTER_S) -> int:
        """Delete the batch keys the watermarks cover, received over ``after_s`` ago."""
        try:
            with Session(self._engine) as session:
                gone = prune_keys(
                    session, older_than=datetime.now(UTC) - timedelta(seconds=after_s)
                )
        except (OperationalError, DBAPIError) as e:  # another process holds the rows: later
            log.info("telemetry key pruning deferred: %s", e)
            return 0
        if gone:
            log.info("pruned %d telemetry batch key(s) the watermarks cover", gone)
        return gone
