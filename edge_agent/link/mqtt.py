"""The agent's MQTT connection to the fleet (paho-mqtt 2.x, MQTT 5).

The agent connects with ``clean_start=False`` and a long session expiry, so the broker keeps
its subscriptions and queues QoS 1 messages while it is offline. Its Last Will marks it
``offline`` (retained); on every (re)connect it publishes ``online`` and its full status.

Reconnects use jittered exponential backoff (:func:`reconnect_delay_s`, as aiomqtt does): a
fleet that lost its broker at once does not come back in lockstep. paho's own backoff has no
jitter, so it is set to zero and the wait happens in the disconnect / connect-failure
callbacks, on paho's network thread, where paho would have waited.

A renewed client certificate is switched to by :meth:`AgentLink.switch_identity`: a second
client with the same client id connects with the new pair and, when the broker accepts it,
takes the session over from the first (MQTT's session takeover: the broker hands the session,
subscriptions and queued messages included, to the newer connection). A broker that refuses the
new certificate never touches the old connection, which goes on as it was.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MqttConfig
from edge_agent.contracts.errors import ConfigError
from edge_agent.protocol.presence import OFFLINE, ONLINE
from edge_agent.protocol.topics import Topics

log = logging.getLogger(__name__)


class _Accepted:
    """The reason code of a CONNACK already seen (by :meth:`AgentLink.switch_identity`)."""

    is_failure = False


_ACCEPTED = _Accepted()


def reconnect_delay_s(
    attempt: int, max_s: float, draw: Callable[[float, float], float] = random.uniform
) -> float:
    """Seconds to wait before reconnect ``attempt`` (1, 2, …): uniform in
    [0, min(max_s, 1.5 ** min(10, attempt))]."""
    return draw(0.0, min(max_s, 1.5 ** min(10, attempt)))


class AgentLink:
    def __init__(
        self,
        device_id: str,
        config: MqttConfig,
        *,
        on_desired: Callable[[bytes], None],
        on_connected: Callable[[], None],
        on_ack: Callable[[bytes], None] = lambda payload: None,
        password: str | None = None,
        reconnect_max_s: float = 60,
    ) -> None:
        self.topics = Topics(device_id)
        self._config = config
        self._on_desired = on_desired
        self._on_connected = on_connected
        self._on_ack = on_ack
        self.connected = threading.Event()
        self._device_id = device_id
        self._password = password
        if config.username is None and password is not None:
            raise ConfigError("mqtt.password_file is set but mqtt.username is not")
        if config.url.startswith("mqtts://") and config.ca_file is None:
            raise ConfigError("an mqtts:// broker needs mqtt.ca_file")
        self._reconnect_max_s = reconnect_max_s
        self._attempt = 0
        self._stopping = threading.Event()
        #: A client whose session a newer one (a renewed certificate's) is taking over: when
        #: the broker drops it, it must not reconnect (it would take the session back).
        self._retiring: mqtt.Client | None = None
        self._switch_lock = threading.Lock()
        client = self._new_client(config.cert_file, config.key_file)
        self._wire(client)
        self._client = client

    def _new_client(self, cert_file: Path | None, key_file: Path | None) -> mqtt.Client:
        config = self._config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._device_id, protocol=mqtt.MQTTv5
        )
        if config.username is not None:
            client.username_pw_set(config.username, self._password)
        client.will_set(self.topics.online, OFFLINE, qos=1, retain=True)
        if config.url.startswith("mqtts://"):
            client.tls_set(
                ca_certs=str(config.ca_file),
                certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None,
            )
        client.reconnect_delay_set(0, 0)  # the jittered wait is ours (see _back_off)
        return client

    def _wire(self, client: mqtt.Client) -> None:
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._config.session_expiry_s
        return props

    def start(self) -> None:
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self._client.loop_start()

    def switch_identity(self, cert_file: Path, key_file: Path, timeout_s: float = 30) -> bool:
        """Connect with a new client certificate and key; True when the broker accepted them
        and the link now runs on that connection (it took the session over from the old
        one). False, with the old connection untouched, when the broker refused them or did
        not answer within ``timeout_s``."""
        with self._switch_lock:
            if self._stopping.is_set():
                return False
            trial = self._new_client(cert_file, key_file)
            accepted, ended = threading.Event(), threading.Event()

            def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
                if reason.is_failure:
                    log.warning("the broker refused the renewed certificate: %s", reason)
                    ended.set()
                else:
                    accepted.set()

            def on_disconnect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
                if not accepted.is_set():
                    log.warning(
                        "the broker closed the renewed certificate's connection: %s", reason
                    )
                ended.set()

            trial.on_connect = on_connect
            trial.on_connect_fail = lambda c, u: ended.set()
            trial.on_disconnect = on_disconnect
            # The session's queued messages come right after the CONNACK: handled as ever.
            trial.on_message = self._handle_message
            old = self._client
            self._retiring = old
            try:
                trial.connect(
                    self._config.host,
                    self._config.port,
                    keepalive=self._config.keepalive_s,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
            except (OSError, ssl.SSLError) as e:  # e.g. the broker refused it in the handshake
                log.warning("the broker refused the renewed certificate: %s", e)
                self._retiring = None
                return False
            trial.loop_start()
            deadline = time.monotonic() + timeout_s
            while not (accepted.is_set() or ended.is_set()) and time.monotonic() < deadline:
                accepted.wait(0.05)
            if not accepted.is_set():
                # Refused (TLS 1.3 reports a refused client certificate after the handshake),
                # or no answer: the trial goes; the old connection never noticed.
                trial.disconnect()
                trial.loop_stop()
                self._retiring = None
                if not old.is_connected() and not self._stopping.is_set():
                    # It dropped meanwhile (and was told not to retry): a client of the old
                    # pair takes its place.
                    log.info("the old connection dropped meanwhile; connecting again with it")
                    old.disconnect()
                    threading.Thread(target=old.loop_stop, name="mqtt-retired", daemon=True).start()
                    self._client = self._new_client(self._config.cert_file, self._config.key_file)
                    self._wire(self._client)
                    self.start()
                return False
            # Accepted: the broker handed the session over and dropped the old connection (or
            # there was none: an expired certificate's client only ever retried).
            self._wire(trial)
            self._client = trial
            old.disconnect()  # a client still retrying stops (one that was dropped has)
            # Its network thread ends after the back-off it may be waiting out (up to a
            # minute): joined on a thread of its own, so that the switch does not wait for it.
            threading.Thread(target=old.loop_stop, name="mqtt-retired", daemon=True).start()
            self._retiring = None
            self._handle_connect(trial, None, None, _ACCEPTED, None)
            log.info("now connected with the renewed certificate")
            return True

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self.connected.is_set():
            info = self._client.publish(self.topics.online, OFFLINE, qos=1, retain=True)
            info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    def publish_status(self, payload: bytes) -> None:
        # Queued by paho while disconnected and sent after the reconnect.
        self._client.publish(self.topics.status, payload, qos=1, retain=True)

    def publish_telemetry(self, payload: bytes) -> bool:
        """Hand a batch to paho (QoS 1); False when not connected (the outbox keeps it)."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(self.topics.telemetry, payload, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info("connected to %s:%s", self._config.host, self._config.port)
        self._attempt = 0
        client.subscribe([(self.topics.desired, 1), (self.topics.ack, 1)])
        client.publish(self.topics.online, ONLINE, qos=1, retain=True)
        self.connected.set()
        self._on_connected()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if client is self._retiring or client is not self._client:
            # A newer connection took this one's session: it must not come back for it.
            client.disconnect()  # (not connected: marks it done, so paho does not reconnect)
            return
        self.connected.clear()
        log.warning("disconnected from broker: %s", reason)
        self._back_off()

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach the broker at %s:%s", self._config.host, self._config.port)
        self._back_off()

    def _back_off(self) -> None:
        if self._stopping.is_set():
            return
        self._attempt += 1
        delay = reconnect_delay_s(self._attempt, self._reconnect_max_s)
        log.info("reconnecting in %.1f s (attempt %d)", delay, self._attempt)
        self._stopping.wait(delay)

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        # An empty retained message is the server deleting a stale document: nothing to do.
        if message.topic == self.topics.desired and message.payload:
            self._on_desired(bytes(message.payload))
        elif message.topic == self.topics.ack:
            self._on_ack(bytes(message.payload))
