"""Enrollment over HTTP (``POST /v1/devices/enroll``): what a device sends with its one-time
token, and the identity it gets back; and the renewal of its MQTT client certificate before it
expires (``POST /v1/devices/{id}/certificate``, authenticated by the device's credential).
Both sides import these structs, so the agent never builds the JSON by hand, and the server's
OpenAPI document names the same fields (their JSON Schema, from msgspec).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta, field

from edge_agent.contracts.structs import Matching, Strict
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = ["CertificateRenewal", "CertificateRequest", "EnrollRequest", "EnrollResponse"]


class EnrollRequest(Strict, frozen=True, kw_only=True):
    token: str
    device_id: Annotated[str, Matching(DEVICE_ID_PATTERN)]
    profile: str
    labels: dict[str, str] = field(default_factory=dict)
    #: The root public key the device expects (pinned out of band); enrollment is refused,
    #: consuming nothing, when the server's differs.
    expected_root_public_key: str | None = None
    #: PEM certificate request (CN = device id) for the device's MQTT client certificate.
    csr: str | None = None
    #: Runtime name → version installed on the device; builds for it use only these.
    runtimes: dict[str, str] | None = None


class EnrollResponse(Strict, frozen=True, forbid_unknown_fields=False, kw_only=True):
    """Read by the agent: fields a newer server adds are ignored."""

    device_id: str
    profile: str
    device_secret: str
    server_url: str
    mqtt_url: str
    #: The fleet's root public key (base64 Ed25519), for the agent to pin.
    root_public_key: str
    #: The device's MQTT client certificate and the fleet CA (when a CSR was sent).
    client_cert: str | None = None
    ca_cert: str | None = None
    #: For brokers without client certificates: username = device id.
    mqtt_password: str


class CertificateRequest(Strict, frozen=True, kw_only=True):
    #: PEM certificate request for a new key (CN = the device's id).
    csr: Annotated[str, Meta(max_length=16384)]


class CertificateRenewal(Strict, frozen=True, forbid_unknown_fields=False, kw_only=True):
    """Read by the agent: fields a newer server adds are ignored."""

    device_id: str
    #: The new client certificate (PEM), and the fleet CA that signed it.
    client_cert: str
    ca_cert: str
    serial: str
    not_after: datetime
