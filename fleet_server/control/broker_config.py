"""The production broker's configuration: a Mosquitto mTLS listener and pattern ACLs that
confine every device to its own topics.

The certificate CN becomes the username (``use_identity_as_username``) and is forced as the
client id (``use_username_as_clientid``, so a device cannot claim another's session), and
``%u`` in the ACL patterns is that CN: a device reads only its own ``desired`` and ``cmd``
and writes only its own ``status``, ``telemetry`` and ``online``. The server's identity may
do everything under ``edgefleet/v1/``. Facts from Mosquitto 2.0.11: subscriptions outside the
ACL are granted but their messages are filtered (so tests check delivery, not SUBACK), and
the dynamic-security plugin cannot use ``%u`` patterns, hence a plain ACL file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_agent.contracts.durable import write_atomic
from fleet_server.auth.broker_acl import INGEST_IDENTITIES, acl_text, ingest_identity
from fleet_server.auth.broker_files import revocation_list
from fleet_server.auth.ca import SERVER_IDENTITY, FleetCA
from fleet_server.auth.mqtt_passwords import mosquitto_hash, static_entries_path


@dataclass(frozen=True)
class BrokerConfig:
    directory: Path
    mosquitto_conf: Path
    acl: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    url: str
    #: Password mode only: the broker's password file and the server's own password file.
    password_file: Path | None = None
    server_password: Path | None = None
    #: mTLS only: the certificate revocation list (``crlfile``), empty at first.
    crl_file: Path | None = None


def _readable_by_broker(path: Path, group: str) -> None:
    """Mosquitto opens its key and ACL after dropping root for its own user: give that user's
    group read access (root:<group> 0640) when we can."""
    import grp

    path.chmod(0o640)
    if os.geteuid() != 0:
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return
    os.chown(path, 0, gid)


def write_broker_config(
    ca: FleetCA,
    out: Path,
    *,
    host: str,
    port: int,
    bind: str = "0.0.0.0",
    broker_group: str = "mosquitto",
    auth: Literal["mtls", "password"] = "mtls",
) -> BrokerConfig:
    """Write everything the broker and the server's MQTT client need into ``out``.

    ``auth="password"`` is the fallback for brokers that cannot check client certificates:
    TLS still authenticates the broker, and each device logs in with its own password
    (username = device id); the same ACL patterns apply.
    """
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)  # mosquitto drops privileges to its own user after start
    ca_cert = out / "ca.crt"
    ca_cert.write_text(ca.cert_pem)
    broker_key, broker_cert = ca.issue_keypair(host, out, "broker", server=True, hosts=[host])
    _readable_by_broker(broker_key, broker_group)
    server_key, server_cert = ca.issue_keypair(SERVER_IDENTITY, out, "server-client", server=False)
    acl = out / "acl"
    acl.write_text(acl_text())
    _readable_by_broker(acl, broker_group)
    data = out / "data"
    data.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        import pwd

        with contextlib.suppress(KeyError):
            os.chown(data, pwd.getpwnam(broker_group).pw_uid, -1)
    password_file = server_password = crl_file = None
    if auth == "mtls":
        # Revoked device certificates (edgefleet devices decommission): the server rewrites
        # this file from its database; Mosquitto rereads it on SIGHUP.
        crl_file = out / "crl.pem"
        crl_file.write_bytes(revocation_list(ca, []))
        _readable_by_broker(crl_file, broker_group)
        identity = f"require_certificate true\nuse_identity_as_username true\ncrlfile {crl_file}\n"
        for i in range(1, INGEST_IDENTITIES + 1):
            ca.issue_keypair(ingest_identity(i), out, f"ingest-{i}-client", server=False)
    else:
        password_file = out / "passwd"
        server_password = out / "server.password"
        entries = []
        for name, path in [(SERVER_IDENTITY, server_password)] + [
            (ingest_identity(i), out / f"ingest-{i}.password")
            for i in range(1, INGEST_IDENTITIES + 1)
        ]:
            secret = secrets.token_urlsafe(32)
            write_atomic(path, (secret + "\n").encode(), mode=0o600)
            entries.append(f"{name}:{mosquitto_hash(secret)}\n")
        static = static_entries_path(password_file)
        static.write_text("".join(entries))
        password_file.write_text(static.read_text())
        _readable_by_broker(password_file, broker_group)
        identity = f"require_certificate false\npassword_file {password_file}\n"
    conf = out / "mosquitto.conf"
    conf.write_text(
        f"# written by edgefleet broker-config ({auth}): one identity per device, pattern ACLs\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"acl_file {acl}\n"
        "persistence true\n"
        f"persistence_location {data}/\n"
        "max_queued_messages 10000\n"
        "\n"
        f"listener {port} {bind}\n"
        f"cafile {ca_cert}\n"
        f"certfile {broker_cert}\n"
        f"keyfile {broker_key}\n" + identity + "use_username_as_clientid true\n"
        "tls_version tlsv1.2\n"
    )
    return BrokerConfig(
        out,
        conf,
        acl,
        ca_cert,
        server_cert,
        server_key,
        f"mqtts://{host}:{port}",
        password_file,
        server_password,
        crl_file,
    )
