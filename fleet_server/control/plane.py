"""The control plane: one MQTT 5 connection from the server to the broker.

Publishes each device's desired-state document (QoS 1, retained) and ingests ``status`` and
``online`` messages into the database. MQTT callbacks only enqueue; a worker thread does the
database work, so a slow database never stalls the network loop.

Self-healing: the database holds the truth. When a device comes online, or reports a
``desired_seq`` older than the server's, the server publishes the stored document again; when
the server (re)connects it does the same for every device that is behind. A document close to
expiry is re-issued with a new ``seq``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from edge_agent.protocol.presence import ONLINE
from edge_agent.protocol.status import ReportedStatus
from edge_agent.protocol.telemetry import ACK_QOS
from edge_agent.protocol.topics import Topics, parse_device_topic
from fleet_server.control.connection import TlsFiles, server_client
from fleet_server.devices import desired
from fleet_server.devices.desired import DesiredDocument
from fleet_server.devices.reports import ReportRow, store_reports
from fleet_server.devices.service import desired_summaries
from fleet_server.devices.tables import DesiredStateRecord, Device
from fleet_server.errors import ConflictError
from fleet_server.keys.service import ServerKeys

log = logging.getLogger(__name__)

#: Messages stored per transaction, at most.
INGEST_BATCH = 1000
STATUS_GROUP = "edgefleet-status"
STATUS_FILTER = Topics.shared(STATUS_GROUP, "status")
#: How long after each connect retained status reports are taken from the plain subscription.
CATCH_UP_S = 30.0
_SHARED, _CATCH_UP = 1, 2


def _subscription(identifier: int) -> Properties:
    properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
    properties.SubscriptionIdentifier = identifier
    return properties


@dataclass(frozen=True, slots=True)
class Behind:
    """A device that may need its document again: what deciding to re-send reads."""

    id: str
    reported_seq: int
    #: It refused the last document it got (it would refuse it again).
    refused: bool


class StatusLimit:
    """A token bucket per device: ``burst`` reports at once, ``per_s`` a second after that. A
    device that floods its status topic (a bug, or a device someone has taken over) is cut
    to that rate, counted, and the rest of the fleet is ingested as before."""

    def __init__(self, per_s: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self._per_s, self._burst, self._clock = per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, device_id: str) -> bool:
        now = self._clock()
        tokens, at = self._buckets.get(device_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._per_s)
        if tokens < 1:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1, now)
        return True


class StatusCounters:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.refused = Counter(
            "edgefleet_status_refused",
            "Status reports not stored, by reason (rate: past the per-device bound; topic: not "
            "a device's topic; malformed; wrong_device: names another device)",
            ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )


class ControlPlane:
    def __init__(
        self,
        engine: Engine,
        mqtt_url: str,
        *,
        device_mqtt_url: str | None = None,
        keys: ServerKeys,
        desired_ttl_s: int = 30 * 24 * 3600,
        resend_interval_s: float = 5.0,
        tls: TlsFiles = (None, None, None),
        credentials: tuple[str, str] | None = None,
        status_per_s: float = 5.0,
        status_burst: float = 50.0,
        registry: CollectorRegistry | None = None,
        catch_up_s: float = CATCH_UP_S,
        ingest: bool = True,
        name: str = "server",
    ) -> None:
        """``status_per_s``, ``status_burst``: the per-device bound on status reports (a
        device reports each lifecycle step, a few a second while it installs); ``registry``:
        where the refusal counters go (``/metrics``); ``ingest``: store status and presence
        reports (False: the API process of a server whose ingest processes do it, which only
        publishes); ``name``: in the MQTT client id."""
        self.status_limit = StatusLimit(status_per_s, status_burst)
        self.counters = StatusCounters(registry)
        self._catch_up_s = catch_up_s
        self._stores_reports = ingest
        self._client, self._host, self._port = server_client(
            mqtt_url, name, tls=tls, credentials=credentials
        )
        self.mqtt_url = mqtt_url
        self.device_mqtt_url = device_mqtt_url or mqtt_url
        self._engine = engine
        self._keys = keys
        self._desired_ttl_s = desired_ttl_s
        self._resend_interval_s = resend_interval_s
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        #: Telemetry ingest on this connection: (subscription filter, where messages go).
        self._telemetry: tuple[str, Callable[[str, bytes], None]] | None = None
        self._last_sent: dict[str, tuple[int, float]] = {}
        #: Called after a status or presence message was stored (the rollout engine wakes).
        self.on_report: Callable[[], None] | None = None
        self.connected = threading.Event()
        self._stopping = False
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="edgefleet-ingest", daemon=True)

    # --- connection ------------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> None:
        self._worker.start()
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self.connected.wait(wait_s):
            log.warning("broker %s not reachable yet; will keep trying", self.mqtt_url)

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        self._worker.join(timeout=10)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the server's connection: %s", reason)
            return
        # Live status reports through the share group: with several server processes each
        # is stored once. Retained ones (what devices reported while no server listened) come
        # from a plain subscription held for CATCH_UP_S after each connect; which of the two
        # delivered a message is told by its subscription identifier (a broker may or may not
        # send retained messages on a shared subscription). Presence stays plain: retained,
        # and idempotent.
        subscriptions = []
        if self._stores_reports:
            client.subscribe(STATUS_FILTER, qos=1, properties=_subscription(_SHARED))
            client.subscribe(
                Topics.all_devices("status"), qos=1, properties=_subscription(_CATCH_UP)
            )
            subscriptions.append((Topics.all_devices("online"), 1))
            timer = threading.Timer(self._catch_up_s, self._end_catch_up)
            timer.daemon = True
            timer.start()
        if self._telemetry is not None:
            subscriptions.append((self._telemetry[0], 1))
        if subscriptions:
            client.subscribe(subscriptions)
        self.connected.set()
        log.info("control plane connected to %s", self.mqtt_url)
        self._inbox.put(("$resync", b""))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        if not self._stopping:
            log.warning("control plane disconnected: %s", reason)

    def _end_catch_up(self) -> None:
        if self.connected.is_set():
            self._client.unsubscribe(Topics.all_devices("status"))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if not message.payload:
            return  # a retained message being cleared (a decommissioned device's): no report
        if self._telemetry is not None and topic.endswith("/telemetry"):
            self._telemetry[1](topic, bytes(message.payload))
            return
        if topic.endswith("/status"):
            via = getattr(message.properties, "SubscriptionIdentifier", None) or [_SHARED]
            if message.retain != (_CATCH_UP in via):
                return  # the other subscription's copy
            found = parse_device_topic(topic)
            if found is None or not self.status_limit.allow(found[0]):
                self.counters.refused.labels("rate" if found else "topic").inc()
                return
        self._inbox.put((topic, bytes(message.payload)))

    def attach_telemetry(self, subscription: str, deliver: Callable[[str, bytes], None]) -> None:
        """Ingest telemetry on this connection (before ``start``): subscribe ``subscription``
        and hand each message to ``deliver`` (on the network thread)."""
        self._telemetry = (subscription, deliver)

    def publish(self, topic: str, payload: bytes) -> None:
        """A telemetry acknowledgement, at QoS 0 (see :data:`ACK_QOS`)."""
        self._client.publish(topic, payload, qos=ACK_QOS)

    # --- publishing ------------------------------------------------------------------------------
    def publish_desired(self, document: DesiredDocument) -> mqtt.MQTTMessageInfo:
        self._last_sent[document.device_id] = (document.seq, time.monotonic())
        return self._client.publish(
            Topics(document.device_id).desired, document.payload, qos=1, retain=True
        )

    def publish_all(self, documents: Mapping[str, DesiredDocument], wait_s: float = 5.0) -> None:
        """Publish each device's document, then wait (up to ``wait_s`` in all) for the broker
        to acknowledge them: when a REST call that changed desired states returns, the broker
        holds them (retained), so a device that subscribes afterwards gets the new one. With
        the broker unreachable they stay queued in the client and are sent on reconnect."""
        sent = [self.publish_desired(document) for document in documents.values()]
        if wait_s <= 0:
            return
        deadline = time.monotonic() + wait_s
        for info in sent:
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:  # not queued: the resend loop covers it
                log.warning("desired-state publish not acknowledged: %s", e)
                return

    def clear_desired(self, device_id: str) -> None:
        """Delete any retained document on the device's topic (an empty retained message).

        Done at enrollment: a device id that was used before (a re-flashed device, a server
        whose database was reset) must not pick up a stale document from the broker.
        """
        self._last_sent.pop(device_id, None)
        self._client.publish(Topics(device_id).desired, b"", qos=1, retain=True)

    def clear_retained(self, device_id: str, wait_s: float = 5.0) -> bool:
        """Delete every message the broker retains for the device (its desired document, its
        last status, its online flag): a decommissioned device leaves nothing behind for a
        subscriber to pick up. True when the broker acknowledged all three within ``wait_s``."""
        self._last_sent.pop(device_id, None)
        topics = Topics(device_id)
        sent = [
            self._client.publish(topic, b"", qos=1, retain=True)
            for topic in (topics.desired, topics.status, topics.online)
        ]
        deadline = time.monotonic() + wait_s
        for info in sent:
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):  # not queued (no connection)
                return False
        return all(info.is_published() for info in sent)

    # --- ingest ----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            # Whatever else is queued goes in the same transaction: a fleet of thousands
            # reports in bursts, and one commit per message would fall behind.
            batch = [item]
            stopping = False
            while len(batch) < INGEST_BATCH:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            if any(topic == "$resync" for topic, _ in batch):
                try:
                    self._resync_all()
                except Exception:
                    log.exception("failed to resync the fleet")
            try:
                self._ingest([(t, p) for t, p in batch if t != "$resync"])
            except Exception:  # one bad batch must not stop ingest
                log.exception("failed to ingest %d message(s)", len(batch))
            if stopping:
                return

    def _ingest(self, messages: list[tuple[str, bytes]]) -> None:
        """Store presence and status messages in order (one transaction), then re-send
        stored documents to the devices that are behind."""
        parsed: list[tuple[str, ReportedStatus | bool]] = []
        for topic, payload in messages:
            found = parse_device_topic(topic)
            if found is None:
                continue
            device_id, kind = found
            if kind == "online":
                parsed.append((device_id, payload == ONLINE))
            elif kind == "status":
                try:
                    status = ReportedStatus.from_bytes(payload)
                except ValueError as e:
                    self.counters.refused.labels("malformed").inc()
                    log.warning("ignoring malformed status from %s: %s", device_id, e)
                    continue
                if status.device_id != device_id:
                    self.counters.refused.labels("wrong_device").inc()
                    log.warning(
                        "status on %s's topic names %s; ignored", device_id, status.device_id
                    )
                    continue
                parsed.append((device_id, status))
        if not parsed:
            return
        with Session(self._engine) as session:
            rows = store_reports(session, parsed)
            session.commit()
            # Reported, or came online: may need the document again.
            reported = {d for d, content in parsed if not isinstance(content, bool)}
            self._resync_many(session, [r for r in rows if r.id in reported or r.online])
        if self.on_report is not None:
            self.on_report()

    def _resync_all(self) -> None:
        with Session(self._engine) as session:
            rows = session.exec(
                select(Device.id, Device.reported_seq, Device.reported).where(
                    col(Device.decommissioned_at).is_(None)
                )
            ).all()
            self._resync_many(
                session,
                [
                    Behind(d, seq, bool((reported or {}).get("refusal")))
                    for d, seq, reported in rows
                ],
            )

    def _resync_many(self, session: Session, devices: Sequence[Behind | ReportRow]) -> None:
        """:meth:`_resync` for many devices, reading their documents in bulk: only those that
        expire soon or were signed under another keyring are re-issued one by one."""
        if not devices:
            return
        try:
            signer = self._keys.signer(session)
        except ConflictError:
            return  # no keys yet: nothing was ever sent
        ring = signer.keyring.signed.version if signer.keyring is not None else None
        stored = desired_summaries(session, [d.id for d in devices])
        soon = datetime.now(UTC) + timedelta(seconds=self._desired_ttl_s // 10)
        for device in devices:
            summary = stored.get(device.id)
            if summary is None:
                continue
            if summary.expires_at <= soon or summary.keyring_version != ring:
                self._resync(session, device)  # re-issued, with a new seq
            elif device.reported_seq < summary.seq:
                record = session.get(DesiredStateRecord, device.id)
                if record is not None:
                    self._send_again(device, record)

    def _resync(self, session: Session, device: Behind | ReportRow) -> None:
        """Send the stored document again if the device is behind (or it is about to expire)."""
        try:
            signer = self._keys.signer(session)
        except ConflictError:
            return  # no keys yet: nothing was ever sent
        refreshed = desired.refresh(
            session,
            device.id,
            ttl_s=self._desired_ttl_s,
            min_remaining_s=self._desired_ttl_s // 10,
            signer=signer,
        )
        if refreshed is not None:
            self.publish_desired(refreshed)
            return
        record = session.get(DesiredStateRecord, device.id)
        if record is None or device.reported_seq >= record.seq:
            return
        self._send_again(device, record)

    def _send_again(self, device: Behind | ReportRow, record: DesiredStateRecord) -> None:
        last = self._last_sent.get(device.id)
        if (
            last is not None
            and last[0] == record.seq
            and (device.refused or time.monotonic() - last[1] < self._resend_interval_s)
        ):
            # A device that refused this document would refuse it again: wait for a new one.
            return
        log.info(
            "device %s reports seq %d < %d; re-sending", device.id, device.reported_seq, record.seq
        )
        self.publish_desired(
            DesiredDocument(device.id, record.seq, json.dumps(record.document).encode())
        )
