"""A server-side MQTT 5 client: the broker URL checked, TLS and credentials applied.

Shared by the control plane and by separate telemetry ingest processes, so both refuse a bad
URL or an incomplete ``mqtts://`` set-up in the same words.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["TlsFiles", "server_client"]

#: CA certificate, client certificate, client key.
TlsFiles = tuple[Path | None, Path | None, Path | None]


def server_client(
    mqtt_url: str,
    name: str,
    *,
    tls: TlsFiles = (None, None, None),
    credentials: tuple[str, str] | None = None,
) -> tuple[mqtt.Client, str, int]:
    """A configured, unconnected client (id ``edgefleet-{name}-<random>``), host and port."""
    parts = urlsplit(mqtt_url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:port, got {mqtt_url!r}")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgefleet-{name}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.reconnect_delay_set(1, 30)
    if parts.scheme == "mqtts":
        ca, cert, key = tls
        if ca is None or (cert is None and credentials is None):
            raise ValueError(
                "an mqtts:// broker needs EDGEFLEET_MQTT_CA_FILE and either a client "
                "certificate (EDGEFLEET_MQTT_CERT_FILE, EDGEFLEET_MQTT_KEY_FILE) or "
                "EDGEFLEET_MQTT_USERNAME/PASSWORD (see `edgefleet broker-config`)"
            )
        client.tls_set(
            ca_certs=str(ca),
            certfile=str(cert) if cert else None,
            keyfile=str(key) if key else None,
        )
    if credentials is not None:
        client.username_pw_set(*credentials)
    return client, parts.hostname, parts.port or 1883
