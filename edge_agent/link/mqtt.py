"""The agent's MQTT connection to the fleet (paho-mqtt 2.x, MQTT 5).

The agent connects with ``clean_start=False`` and a long session expiry, so the broker keeps
its subscriptions and queues QoS 1 messages while it is offline. Its Last Will marks it
``offline`` (retained); on every (re)connect it publishes ``online`` and its full status.
paho reconnects by itself with exponential backoff between ``reconnect_min_s`` and
``reconnect_max_s``.
"""

from __future__ import annotations

import logging
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


class AgentLink:
    def __init__(
        self,
        device_id: str,
        config: MqttConfig,
        *,
        on_desired: Callable[[bytes], None],
        on_connected: Callable[[], None],
        password: str | None = None,
        reconnect_min_s: float = 1,
        reconnect_max_s: float = 60,
    ) -> None:
        self.topics = Topics(device_id)
        self._config = config
        self._on_desired = on_desired
        self._on_connected = on_connected
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
        client.reconnect_delay_set(int(reconnect_min_s), int(reconnect_max_s))
        client.on_connect = self._handle_connect
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
        if self.connected.is_set():
            info = self._client.publish(self.topics.online, OFFLINE, qos=1, retain=True)
            info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    def publish_status(self, payload: bytes) -> None:
        # Queued by paho while disconnected and sent after the reconnect.
        self._client.publish(self.topics.status, payload, qos=1, retain=True)

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info("connected to %s:%s", self._config.host, self._config.port)
        client.subscribe(self.topics.desired, qos=1)
        client.publish(self.topics.online, ONLINE, qos=1, retain=True)
        self.connected.set()
        self._on_connected()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        log.warning("disconnected from broker: %s", reason)

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        # An empty retained message is the server deleting a stale document: nothing to do.
        if message.topic == self.topics.desired and message.payload:
            self._on_desired(bytes(message.payload))
