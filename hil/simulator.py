"""A fleet simulator: many protocol-only devices in one process, for scale tests and benchmarks.

Each simulated device is enrolled through the real REST API (its own identity and MQTT
password), holds its own MQTT 5 connection to the real broker (client id and username = the
device id, a persistent session, a retained ``offline`` will), and speaks the agent's protocol:
it takes its retained desired-state document, checks it as an agent does (device, ``seq``,
expiry, the keyring signed by the pinned root, the document signed by a key of that keyring),
reports each slot through DOWNLOADING → PROBATION → COMMITTED (or FAILED / ROLLED_BACK, as its
behaviour says) on its retained ``status`` topic, and sends telemetry batches (requests, errors,
a latency sketch) that it resends until the server acknowledges them.

It runs no model: what a version does on the device is a :class:`Behaviour` chosen per version
(install time, an install failure or an agent rollback, latency, error rate, traffic). Real
agent processes are still what the behaviour tests use (``hil.rig``).

All connections are driven by one selector loop (paho's external-loop callbacks), so 10,000
devices are 10,000 sockets and one thread, not 10,000 threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import logging
import random
import secrets
import selectors
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import __version__
from edge_agent.contracts.errors import EdgefleetError
from edge_agent.protocol.desired import SignedDesiredState, SlotAssignment
from edge_agent.protocol.lifecycle import SlotEvent, SlotState
from edge_agent.protocol.presence import OFFLINE, ONLINE
from edge_agent.protocol.status import ReportedStatus, SlotError, SlotStatus, Transition, VersionRef
from edge_agent.protocol.telemetry import SlotFigures, TelemetryAck, TelemetryBatch
from edge_agent.protocol.topics import Topics
from edge_agent.telemetry.sketch import new_sketch, to_wire
from edge_agent.trust.keyring import Keyring, check_signed, verify_keyring
from edge_agent.trust.signing import public_key_from_b64

__all__ = ["Behaviour", "FleetSimulator", "SimulatedDevice", "enroll_fleet"]

log = logging.getLogger(__name__)

RUNTIME_OF = {"jetson": "tensorrt", "raspberry": "litert"}


@dataclass(frozen=True)
class Behaviour:
    """What one model version does on a simulated device."""

    #: From the document's arrival to the end of probation.
    install_s: float = 0.2
    #: None: it commits. A reason (``selftest_failed``, …): the install fails before the
    #: switch (FAILED). ``"probation:<reason>"``: the agent rolls it back (ROLLED_BACK).
    fail: str | None = None
    latency_ms: float = 1.0
    error_rate: float = 0.0
    #: Requests served per telemetry interval (0: no telemetry for it).
    requests_per_interval: int = 0
    #: Labels applications send back per interval, and the share of them that is right.
    labels_per_interval: int = 0
    accuracy: float = 1.0


@dataclass
class SimulatedDevice:
    device_id: str
    profile: str
    mqtt_password: str
    labels: dict[str, str] = field(default_factory=dict)
    #: The fleet root key it pinned at enrollment (base64).
    root_public_key: str | None = None
    #: Slot → what it serves (committed) and what it served before.
    committed: dict[str, SlotAssignment] = field(default_factory=dict)
    previous: dict[str, SlotAssignment] = field(default_factory=dict)
    states: dict[str, SlotState] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    errors: dict[str, SlotError] = field(default_factory=dict)
    desired_seq: int = 0
    last_transition: Transition | None = None
    client: mqtt.Client | None = None
    connected: bool = False
    #: When each slot's version became active (for switch-time spreads).
    activated_at: dict[str, float] = field(default_factory=dict)
    stream: str = field(default_factory=lambda: secrets.token_hex(8))
    telemetry_seq: int = 0
    acked_seq: int = 0
    unacked: dict[int, tuple[float, bytes]] = field(default_factory=dict)
    generation: int = 0  # bumps on each new document: stale timers do nothing


def _share(device_id: str) -> float:
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big") / 2**32


#: Tokens asked for in one request (the server's limit).
BATCH_TOKENS = 10_000


def enroll_fleet(
    api: Any,
    count: int,
    *,
    prefix: str,
    profile: str = "x86-64-avx2",
    labels: dict[str, str] | None = None,
    workers: int = 1,
) -> list[SimulatedDevice]:
    """Enroll ``count`` devices through the REST API as a pallet arrives: the operator asks
    for their single-use tokens in batches (``POST /v1/enrollment-tokens/batch``), and each
    device trades its own, ``workers`` at a time; returns them with their MQTT credentials."""
    tokens: list[str] = []
    while len(tokens) < count:
        batch = min(BATCH_TOKENS, count - len(tokens))
        tokens += api.post(
            "/v1/enrollment-tokens/batch", json={"count": batch, "profile": profile}
        )["tokens"]

    def one(i: int) -> SimulatedDevice:
        device_id = f"{prefix}-{i:05d}"
        token = tokens[i]
        enrolled = api.post(
            "/v1/devices/enroll",
            json={"token": token, "device_id": device_id, "profile": profile,
                  "labels": labels or {}},
        )  # fmt: skip
        return SimulatedDevice(
            device_id,
            profile,
            enrolled["mqtt_password"],
            dict(labels or {}),
            root_public_key=enrolled["root_public_key"],
        )

    if workers <= 1:
        return [one(i) for i in range(count)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(count)))


class FleetSimulator:
    def __init__(
        self,
        mqtt_url: str,
        devices: Iterable[SimulatedDevice],
        *,
        root_public_key: str | None = None,
        behaviours: dict[str, Behaviour] | None = None,
        default: Behaviour = Behaviour(),
        telemetry_interval_s: float = 1.0,
        resend_after_s: float = 5.0,
        status_interval_s: float = 60.0,
        telemetry_share: float = 1.0,
        seed: int = 0,
    ) -> None:
        """``root_public_key``: the fleet root (base64) documents are checked against; None
        skips signature checks (cheaper, for the largest benchmarks). ``behaviours``: version
        → what it does; others behave as ``default``."""
        host, _, port = mqtt_url.removeprefix("mqtt://").partition(":")
        self.host, self.port = host, int(port or 1883)
        self.devices = {d.device_id: d for d in devices}
        self.behaviours = dict(behaviours or {})
        self.default = default
        self.telemetry_interval_s = telemetry_interval_s
        #: Each device reports its status at least this often, as an agent does
        #: (``[reporting] status_interval_s``): a report the broker dropped is not lost.
        self.status_interval_s = status_interval_s
        #: The share of devices that send telemetry (chosen by id, so always the same ones):
        #: a gate needs figures from enough devices, not from every one of 10,000.
        self.telemetry_share = telemetry_share
        self.resend_after_s = resend_after_s
        self._root = public_key_from_b64(root_public_key) if root_public_key else None
        self._rings: dict[int, Keyring] = {}
        self._rng = random.Random(seed)
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._round_figures: dict[tuple[str, str, str | None, str], SlotFigures | None] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.documents = 0
        self.refused: dict[str, int] = {}
        self.statuses_sent = 0
        self.batches_sent = 0

    # --- running ---------------------------------------------------------------------------------
    def start(self, connect_timeout_s: float = 120.0) -> FleetSimulator:
        for device in self.devices.values():
            self._connect(device)
        self._thread = threading.Thread(target=self._loop, name="fleet-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + connect_timeout_s
        while not all(d.connected for d in self.devices.values()):
            if time.monotonic() > deadline:
                missing = sum(1 for d in self.devices.values() if not d.connected)
                raise TimeoutError(f"{missing} simulated devices did not connect")
            time.sleep(0.05)
        self.schedule(self.telemetry_interval_s, self._telemetry_round)
        self.schedule(self.status_interval_s, self._status_round)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for device in self.devices.values():
            if device.client is not None:
                try:
                    device.client.disconnect()
                    device.client.loop_write()
                except Exception:  # closing anyway
                    pass
                sock = device.client.socket()
                if sock is not None:
                    sock.close()
        self._selector.close()

    def __enter__(self) -> FleetSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._lock:
            self._timer_seq += 1
            heapq.heappush(self._timers, (time.monotonic() + delay_s, self._timer_seq, action))

    def disconnect(self, device_id: str) -> None:
        """Take a device offline (its will says so), until :meth:`reconnect`."""

        def go() -> None:
            device = self.devices[device_id]
            if device.client is not None:
                sock = device.client.socket()
                device.connected = False
                if sock is not None:
                    self._unregister(sock)
                    sock.close()  # an abrupt loss: the broker publishes the will

        self.schedule(0, go)

    def reconnect(self, device_id: str) -> None:
        self.schedule(0, lambda: self._connect(self.devices[device_id]))

    def _loop(self) -> None:
        last_misc = 0.0
        while not self._stopping.is_set():
            with self._lock:
                next_at = self._timers[0][0] if self._timers else time.monotonic() + 0.1
            timeout = max(0.0, min(0.1, next_at - time.monotonic()))
            try:
                events = self._selector.select(timeout) if self._selector.get_map() else []
            except (OSError, ValueError):
                events = []
            if not self._selector.get_map():
                time.sleep(timeout)
            for key, mask in events:
                client: mqtt.Client = key.data
                try:
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE:
                        client.loop_write()
                except Exception:
                    log.exception("simulated device I/O failed")
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._timers or self._timers[0][0] > now:
                        break
                    _, _, action = heapq.heappop(self._timers)
                try:
                    action()
                except Exception:
                    log.exception("simulated device action failed")
            if now - last_misc > 1.0:
                last_misc = now
                for device in self.devices.values():
                    if device.client is not None and device.connected:
                        device.client.loop_misc()

    # --- the connection --------------------------------------------------------------------------
    def _watch(self, client: mqtt.Client, sock: Any, *, write: bool, new: bool = False) -> None:
        """paho's external-loop callbacks: which of a client's socket events the loop waits
        for."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        if new:
            self._selector.register(sock, events, client)
        else:
            self._selector.modify(sock, events, client)

    def _connect(self, device: SimulatedDevice) -> None:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv5
        )
        client.username_pw_set(device.device_id, device.mqtt_password)
        topics = Topics(device.device_id)
        client.will_set(topics.online, OFFLINE, qos=1, retain=True)
        client.on_connect = lambda c, u, f, rc, p: self._connected(device, rc)
        client.on_message = lambda c, u, m: self._message(device, m)
        client.on_socket_open = lambda c, u, sock: self._watch(c, sock, write=False, new=True)
        client.on_socket_close = lambda c, u, sock: self._unregister(sock)
        client.on_socket_register_write = lambda c, u, sock: self._watch(c, sock, write=True)
        client.on_socket_unregister_write = lambda c, u, sock: self._watch(c, sock, write=False)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        device.client = client
        client.connect(self.host, self.port, keepalive=60, clean_start=False, properties=props)

    def _unregister(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _connected(self, device: SimulatedDevice, reason: Any) -> None:
        if reason.is_failure:
            log.error("broker refused simulated device %s: %s", device.device_id, reason)
            return
        assert device.client is not None
        topics = Topics(device.device_id)
        device.client.subscribe([(topics.desired, 1), (topics.ack, 1)])
        device.client.publish(topics.online, ONLINE, qos=1, retain=True)
        self._report(device)
        for _, (_, payload) in sorted(device.unacked.items()):
            device.client.publish(topics.telemetry, payload, qos=1)
        device.connected = True

    def _message(self, device: SimulatedDevice, message: mqtt.MQTTMessage) -> None:
        if message.topic.endswith("/ack"):
            try:
                ack = TelemetryAck.from_bytes(bytes(message.payload))
            except ValueError:
                return
            if ack.stream == device.stream:
                device.acked_seq = max(device.acked_seq, ack.acked_seq)
                for seq in [s for s in device.unacked if s <= ack.acked_seq]:
                    del device.unacked[seq]
            return
        if message.payload:
            self._desired(device, bytes(message.payload))

    # --- desired state and the lifecycle ---------------------------------------------------------
    def _refuse(self, device: SimulatedDevice, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def _desired(self, device: SimulatedDevice, payload: bytes) -> None:
        try:
            envelope = SignedDesiredState.from_bytes(payload)
            doc = envelope.signed
            if doc.device_id != device.device_id:
                return self._refuse(device, "wrong_device")
            if doc.seq <= device.desired_seq:
                return None  # the retained copy of what we have, or a replay
            if doc.is_expired():
                return self._refuse(device, "desired_state_expired")
            if self._root is not None:
                self._check_signatures(envelope)
        except EdgefleetError as e:
            return self._refuse(device, e.reason)
        self.documents += 1
        device.desired_seq = doc.seq
        device.generation += 1
        generation = device.generation
        for slot, assignment in doc.slots.items():
            current = device.committed.get(slot)
            if current is not None and current.bundle_sha256 == assignment.bundle_sha256:
                continue
            self._deploy(device, slot, assignment, generation)
        for slot in [s for s in device.committed if s not in doc.slots]:
            device.committed.pop(slot)
            device.states.pop(slot, None)
        self._report(device)
        return None

    def _check_signatures(self, envelope: SignedDesiredState) -> None:
        assert self._root is not None
        if envelope.keyring is None:
            raise EdgefleetError("no keyring", reason="keyring_invalid")
        version = envelope.keyring.signed.version
        ring = self._rings.get(version)
        if ring is None:
            ring = verify_keyring(envelope.keyring, self._root)
            self._rings[version] = ring
        check_signed(ring, envelope.signed_bytes(), envelope.signatures, "desired state")

    def behaviour(self, version: str) -> Behaviour:
        return self.behaviours.get(version, self.default)

    def _deploy(
        self, device: SimulatedDevice, slot: str, assignment: SlotAssignment, generation: int
    ) -> None:
        b = self.behaviour(assignment.version)
        device.targets[slot] = assignment.bundle_sha256
        device.errors.pop(slot, None)
        self._transition(device, slot, SlotState.DOWNLOADING, SlotEvent.DEPLOY, assignment)

        def finish() -> None:
            if device.generation != generation:
                return  # a newer document took over
            if b.fail is not None and not b.fail.startswith("probation:"):
                device.errors[slot] = SlotError(reason=b.fail, message=f"simulated {b.fail}")
                self._transition(device, slot, SlotState.FAILED, SlotEvent.FAILURE, assignment)
            elif b.fail is not None:
                reason = b.fail.removeprefix("probation:")
                device.errors[slot] = SlotError(reason=reason, message=f"simulated {reason}")
                self._transition(device, slot, SlotState.ROLLED_BACK, SlotEvent.SUCCESS,
                                 assignment)  # fmt: skip
            else:
                if slot in device.committed:
                    device.previous[slot] = device.committed[slot]
                device.committed[slot] = assignment
                device.targets.pop(slot, None)
                device.activated_at[slot] = time.time()
                self._transition(device, slot, SlotState.COMMITTED, SlotEvent.SUCCESS, assignment)
            self._report(device)

        self.schedule(b.install_s, finish)

    def _transition(
        self,
        device: SimulatedDevice,
        slot: str,
        state: SlotState,
        event: SlotEvent,
        assignment: SlotAssignment,
    ) -> None:
        old = device.states.get(slot, SlotState.IDLE)
        device.states[slot] = state
        error = device.errors.get(slot)
        device.last_transition = Transition(
            slot=slot, from_state=old, to_state=state, event=event, at=datetime.now(UTC),
            bundle_sha256=assignment.bundle_sha256,
            reason=error.reason if error else None, message=error.message if error else None,
        )  # fmt: skip

    def _ref(self, device: SimulatedDevice, a: SlotAssignment) -> VersionRef:
        family = next((r for k, r in RUNTIME_OF.items() if device.profile.startswith(k)), None)
        return VersionRef(model=a.model, version=a.version, bundle_sha256=a.bundle_sha256,
                          runtime=family or "onnxruntime", precision="fp32")  # fmt: skip

    def _report(self, device: SimulatedDevice) -> None:
        if device.client is None:
            return
        slots = {}
        for slot, state in device.states.items():
            active = device.committed.get(slot)
            slots[slot] = SlotStatus(
                state=state,
                active=self._ref(device, active) if active else None,
                target_sha256=device.targets.get(slot),
                error=device.errors.get(slot),
            )
        status = ReportedStatus(
            device_id=device.device_id, profile=device.profile, agent_version=__version__,
            desired_seq=device.desired_seq, slots=slots, last_transition=device.last_transition,
            reported_at=datetime.now(UTC),
        )  # fmt: skip
        device.client.publish(Topics(device.device_id).status, status.to_bytes(), qos=1,
                              retain=True)  # fmt: skip
        self.statuses_sent += 1

    def _status_round(self) -> None:
        if self._stopping.is_set():
            return
        # Spread over the interval, as a fleet's agents are (they did not all start at once).
        devices = [d for d in self.devices.values() if d.connected]
        for i, device in enumerate(devices):
            self.schedule(self.status_interval_s * i / max(1, len(devices)),
                          functools.partial(self._report, device))  # fmt: skip
        self.schedule(self.status_interval_s, self._status_round)

    # --- telemetry -------------------------------------------------------------------------------
    def _telemetry_round(self) -> None:
        if self._stopping.is_set():
            return
        end = datetime.now(UTC)
        start = end - timedelta(seconds=self.telemetry_interval_s)
        now = time.monotonic()
        self._round_figures = {}
        for device in self.devices.values():
            if not device.connected or device.client is None:
                continue
            if self.telemetry_share < 1 and _share(device.device_id) >= self.telemetry_share:
                continue
            for seq, (sent_at, payload) in list(device.unacked.items()):
                if now - sent_at > self.resend_after_s:
                    device.unacked[seq] = (now, payload)
                    device.client.publish(Topics(device.device_id).telemetry, payload, qos=1)
            figures = [f for f in self._figures(device) if f is not None]
            if not figures:
                continue
            device.telemetry_seq += 1
            batch = TelemetryBatch(
                device_id=device.device_id, stream=device.stream, seq=device.telemetry_seq,
                floor=device.acked_seq, interval_start=start, interval_end=end, slots=figures,
            )  # fmt: skip
            payload = batch.to_bytes()
            device.unacked[batch.seq] = (now, payload)
            device.client.publish(Topics(device.device_id).telemetry, payload, qos=1)
            self.batches_sent += 1
        self.schedule(self.telemetry_interval_s, self._telemetry_round)

    def _figures(self, device: SimulatedDevice) -> list[SlotFigures | None]:
        # The devices serving one bundle for one rollout in one round report the same figures
        # (one sample of the behaviour): building them once keeps a 10,000-device round cheap.
        out: list[SlotFigures | None] = []
        for slot, a in device.committed.items():
            key = (slot, a.bundle_sha256, a.rollout_id, a.version)
            if key not in self._round_figures:
                self._round_figures[key] = self._sample_figures(slot, a)
            out.append(self._round_figures[key])
        return out

    def _sample_figures(self, slot: str, a: SlotAssignment) -> SlotFigures | None:
        b = self.behaviour(a.version)
        n = b.requests_per_interval
        if n <= 0:
            return None
        sketch = new_sketch()
        errors = 0
        for _ in range(n):
            if self._rng.random() < b.error_rate:
                errors += 1
            else:
                sketch.add(max(1e-3, self._rng.gauss(b.latency_ms, b.latency_ms * 0.1)))
        labelled = b.labels_per_interval
        correct = sum(1 for _ in range(labelled) if self._rng.random() < b.accuracy)
        return SlotFigures(
            slot=slot, role="active", model=a.model, version=a.version,
            bundle_sha256=a.bundle_sha256, rollout_id=a.rollout_id, requests=n, errors=errors,
            nonfinite=0, latency_ms=to_wire(sketch), labelled=labelled, correct=correct,
        )  # fmt: skip

    # --- what a test or benchmark reads ----------------------------------------------------------
    def serving(self, slot: str) -> dict[str, int]:
        """How many devices serve each version in ``slot``."""
        counts: dict[str, int] = {}
        for device in self.devices.values():
            a = device.committed.get(slot)
            if a is not None:
                counts[a.version] = counts.get(a.version, 0) + 1
        return counts
