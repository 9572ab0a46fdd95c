"""The agent's MQTT connection to the fleet (paho-mqtt 2.x, MQTT 5).

The agent connects with ``clean_start=False`` and a long session expiry, so the broker keeps
its subscriptions and queues QoS 1 messages while it is offline. Its Last Will marks it
``offline`` (retained); on every (re)connect it publishes ``online`` and its full status.

Reconnects use jittered exponential backoff (:func:`reconnect_delay_s`, as aiomqtt does): a
fleet that lost its broker at once does not come back in lockstep. paho's own backoff has no
jitter, so it is set to zero and the wait happens in the disconnect / connect-failure
callbacks, on paho's network thread, where paho would have waited.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
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
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        if config.username is not None:
            client.username_pw_set(config.username, password)
        elif password is not None:
            raise ConfigError("mqtt.password_file is set but mqtt.username is not")
        client.will_set(self.topics.online, OFFLINE, qos=1, retain=True)
        if config.url.startswith("mqtts://"):
            if config.ca_file is None:
                raise ConfigError("an mqtts:// broker needs mqtt.ca_file")
            client.tls_set(
                ca_certs=str(config.ca_file),
                certfile=str(config.cert_file) if config.cert_file else None,
                keyfile=str(config.key_file) if config.key_file else None,
            )
        client.reconnect_delay_set(0, 0)  # the jittered wait is ours (see _back_off)
        self._reconnect_max_s = reconnect_max_s
        self._attempt = 0
        self._stopping = threading.Event()
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._config.session_expiry_s
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

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
