"""Device identities on a real Mosquitto running the configuration `edgefleet broker-config`
writes: mTLS with per-device certificates from the fleet CA, and pattern ACLs. Delivery is
what is tested (Mosquitto grants a forbidden SUBSCRIBE and then filters the messages)."""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol import Topics
from fleet_server.auth.broker_acl import INGEST_IDENTITIES, ingest_identity
from fleet_server.auth.ca import FleetCA
from fleet_server.broker import free_port
from fleet_server.control.broker_config import BrokerConfig, write_broker_config
from hil.rig import wait_until


@dataclass
class Broker:
    config: BrokerConfig
    ca: FleetCA
    port: int
    certs: Path
    process: subprocess.Popen[bytes] | None = None


def _start(auth: str) -> Iterator[Broker]:
    from tests.conftest import _ensure_mosquitto

    _ensure_mosquitto()
    # Mosquitto reads its ACL file and key after dropping root for its own user: the files
    # must be reachable by that user, as under /etc/mosquitto (pytest's temp root is 0700).
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="edgefleet-secured-"))
    root.chmod(0o755)
    ca = FleetCA.load_or_create(root / "ca")
    port = free_port()
    config = write_broker_config(
        ca,
        root / "broker",
        host="127.0.0.1",
        port=port,
        bind="127.0.0.1",
        auth=auth,  # type: ignore[arg-type]
    )
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    log = (root / "mosquitto.log").open("wb")
    proc = subprocess.Popen(
        [mosquitto, "-c", str(config.mosquitto_conf)], stdout=log, stderr=subprocess.STDOUT
    )

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((root / "mosquitto.log").read_text())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, 10, "the secured broker")
        yield Broker(config, ca, port, root / "certs", proc)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def secured() -> Iterator[Broker]:
    yield from _start("mtls")


@pytest.fixture(scope="module")
def password_broker() -> Iterator[Broker]:
    yield from _start("password")


def device_identity(broker: Broker, ca: FleetCA, device_id: str) -> tuple[Path, Path]:
    """What `edge-agent enroll` does: a key here, a CSR signed by the fleet CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    cert_pem = ca.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), device_id)
    broker.certs.mkdir(exist_ok=True)
    key_path, cert_path = broker.certs / f"{device_id}.key", broker.certs / f"{device_id}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_text(cert_pem)
    return cert_path, key_path


class Peer:
    def __init__(
        self,
        broker: Broker,
        client_id: str,
        cert: Path | None,
        key: Path | None,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(broker.config.ca_cert),
            certfile=str(cert) if cert else None,
            keyfile=str(key) if key else None,
        )
        self.refused: str | None = None

        def on_connect(
            c: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object
        ) -> None:
            if rc.is_failure:
                self.refused = str(rc)
            self.connected.set()

        def on_disconnect(
            c: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object
        ) -> None:
            if not self.connected.is_set():  # dropped before any CONNACK: TLS refused us
                self.refused = f"disconnected: {rc}"
                self.connected.set()

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        if login is not None:
            self.client.username_pw_set(*login)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not self.connected.wait(5) or self.refused:
            self.close()
            raise ConnectionRefusedError(f"{client_id}: {self.refused or 'no CONNACK'}")

    def sub(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        time.sleep(0.2)

    def pub(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def got(self, timeout_s: float = 1.0) -> list[tuple[str, bytes]]:
        out, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                out.append(self.inbox.get(timeout=0.05))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(secured: Broker) -> Iterator[dict[str, Peer]]:
    # Per test: a peer on the server's identity must not outlive its test (the broker makes
    # the identity the client id, so it would take the real server's session over and back).
    made = {
        "server": Peer(
            secured, "edgefleet-server", secured.config.server_cert, secured.config.server_key
        ),
        "a": Peer(secured, "dev-a", *device_identity(secured, secured.ca, "dev-a")),
        "b": Peer(secured, "dev-b", *device_identity(secured, secured.ca, "dev-b")),
    }
    made["server"].sub(Topics.all_devices("status"))
    made["a"].sub(Topics("dev-a").desired)
    made["b"].sub(Topics("dev-b").desired)
    yield made
    for p in made.values():
        p.close()


def test_devices_use_their_own_topics_and_the_server_sees_them(peers: dict[str, Peer]) -> None:
    peers["a"].pub(Topics("dev-a").status, b"a-status")
    assert (Topics("dev-a").status, b"a-status") in peers["server"].got()
    peers["server"].pub(Topics("dev-a").desired, b"doc-for-a")
    assert peers["a"].got() == [(Topics("dev-a").desired, b"doc-for-a")]


def test_a_device_cannot_publish_on_another_devices_topics(peers: dict[str, Peer]) -> None:
    for kind in ("status", "online", "telemetry", "desired"):
        peers["a"].pub(getattr(Topics("dev-b"), kind), b"forged")
    # Only dev-b's topics: the module's broker keeps other tests' devices' retained statuses.
    assert [m for m in peers["server"].got() if "/dev-b/" in m[0]] == []
    assert peers["b"].got() == []


def test_a_device_cannot_receive_another_devices_messages(peers: dict[str, Peer]) -> None:
    peers["a"].sub(Topics("dev-b").desired)
    peers["a"].sub("edgefleet/v1/#")
    peers["server"].pub(Topics("dev-b").desired, b"doc-for-b")
    assert peers["b"].got() == [(Topics("dev-b").desired, b"doc-for-b")]
    assert peers["a"].got() == []


def test_a_device_cannot_take_over_another_devices_session(
    secured: Broker, peers: dict[str, Peer]
) -> None:
    """The client id is forced to the certificate's CN: claiming 'dev-b' does not kick dev-b."""
    cert, key = device_identity(secured, secured.ca, "dev-c")
    impostor = Peer(secured, "dev-b", cert, key)
    try:
        peers["server"].pub(Topics("dev-b").desired, b"still-b")
        assert (Topics("dev-b").desired, b"still-b") in peers["b"].got()
        assert impostor.got() == []
    finally:
        impostor.close()


def test_certificates_from_another_ca_or_none_are_refused(secured: Broker, tmp_path: Path) -> None:
    stranger_ca = FleetCA.load_or_create(tmp_path / "other-ca")
    other = Broker(secured.config, stranger_ca, secured.port, tmp_path / "certs")
    cert, key = device_identity(other, stranger_ca, "dev-a")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        Peer(secured, "dev-a-forged", cert, key)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        Peer(secured, "anonymous", None, None)


def test_a_csr_must_name_the_device(secured: Broker) -> None:
    from fleet_server.errors import InvalidInputError

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-server")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(InvalidInputError, match="CN=dev-x"):
        secured.ca.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), "dev-x")
    with pytest.raises(InvalidInputError, match="PEM"):
        secured.ca.sign_device_csr("not a csr", "dev-x")


@pytest.mark.slow
def test_the_whole_path_over_mtls(secured: Broker, model_path: Path, uid: str) -> None:
    """Server and agent both on certificate identities; the agent's key never left it."""
    from fleet_server.client import ApiClient
    from fleet_server.server import EmbeddedStack
    from fleet_server.settings import Settings
    from hil.rig import LocalAgent

    root = secured.config.directory.parent  # its ca/ is the CA the broker trusts
    settings = Settings(
        data_dir=root,
        port=0,
        mqtt_url=secured.config.url,
        mqtt_ca_file=secured.config.ca_cert,
        mqtt_cert_file=secured.config.server_cert,
        mqtt_key_file=secured.config.server_key,
        desired_resend_interval_s=0.2,
    )
    device = f"tls-{uid}"
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, stack.admin_token)
        assert api.get("/healthz")["broker_connected"]
        api.upload_model(model_path, "classifier", "1.0.0")
        token = api.post("/v1/enrollment-tokens", json={})["token"]
        agent = LocalAgent(root / "devices", device, "x86-64-avx2")
        agent.enroll(stack.url, token)
        assert "mqtts://" in (agent.dir / "agent.toml").read_text()
        assert (agent.dir / "device.key").stat().st_mode & 0o777 == 0o600
        cert = x509.load_pem_x509_certificate((agent.dir / "device.crt").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={device}"
        agent.configure("[telemetry]\ninterval_s = 1\ncheckpoint_s = 0.5\nresend_after_s = 2\n")
        agent.start()
        try:
            agent.wait_ready()
            api.post(
                "/v1/rollouts",
                json={"model": "classifier", "version": "1.0.0", "devices": [device]},
            )
            agent.wait_serving("classifier", "1.0.0")
            wait_until(lambda: api.get(f"/v1/devices/{device}")["online"], 10, "presence over mTLS")
            # Telemetry through the ACLs: the device writes its telemetry topic, the server
            # ingests it on its one connection ($share/) and acknowledges on the device's ack.
            for _ in range(5):
                agent.client.predict("classifier", {"x": np.ones((1, 16), np.float32)})

            def stored_and_acknowledged() -> bool:
                streams = api.get(f"/v1/telemetry/devices/{device}")
                rows = api.get("/v1/telemetry/models/classifier")
                state = agent.dir / "state" / "telemetry"
                pending = [p for p in state.iterdir() if p.suffix == ".batch"]
                return bool(streams and rows and rows[0]["requests"] == 5 and not pending)

            try:
                wait_until(stored_and_acknowledged, 20, "telemetry over mTLS, acknowledged")
            except TimeoutError:
                pytest.fail(
                    f"telemetry not stored and acknowledged: streams "
                    f"{api.get(f'/v1/telemetry/devices/{device}')}, rows "
                    f"{api.get('/v1/telemetry/models/classifier')}, outbox "
                    f"{sorted(p.name for p in (agent.dir / 'state' / 'telemetry').iterdir())}\n"
                    f"{agent.log_tail(30)}"
                )
        finally:
            agent.stop()


@pytest.mark.slow
def test_password_fallback(password_broker: Broker, model_path: Path, uid: str) -> None:
    """A broker without client certificates: per-device passwords (the server keeps hashes
    and rewrites the broker's password file at enrollment), the same ACLs, a full agent path."""
    import os
    import signal

    from fleet_server.client import ApiClient
    from fleet_server.server import EmbeddedStack
    from fleet_server.settings import Settings
    from hil.rig import LocalAgent

    cfg = password_broker.config
    assert cfg.password_file is not None and cfg.server_password is not None
    root = cfg.directory.parent
    settings = Settings(
        data_dir=root,
        port=0,
        mqtt_url=cfg.url,
        mqtt_ca_file=cfg.ca_cert,
        mqtt_username="edgefleet-server",
        mqtt_password=cfg.server_password.read_text().strip(),  # type: ignore[arg-type]
        broker_password_file=cfg.password_file,
        desired_resend_interval_s=0.2,
    )
    a_id, b_id = f"pa-{uid}", f"pb-{uid}"
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, stack.admin_token)
        assert api.get("/healthz")["broker_connected"]
        replies = {}
        for device in (a_id, b_id):
            token = api.post("/v1/enrollment-tokens", json={})["token"]
            replies[device] = api.post(
                "/v1/devices/enroll",
                json={"token": token, "device_id": device, "profile": "x86-64-avx2"},
            )
    lines = cfg.password_file.read_text().splitlines()
    ingest = {ingest_identity(i) for i in range(1, INGEST_IDENTITIES + 1)}
    assert {line.split(":")[0] for line in lines} == {"edgefleet-server", a_id, b_id} | ingest
    assert all(replies[d]["mqtt_password"] not in cfg.password_file.read_text() for d in replies)
    assert password_broker.process is not None
    os.kill(password_broker.process.pid, signal.SIGHUP)  # reload the password file
    time.sleep(0.5)

    # With the server stopped, an observer can hold the server's identity (the client id is
    # forced to the username, so two holders would take over each other's session).
    def login(device: str, password: str | None = None) -> Peer:
        return Peer(
            password_broker,
            device,
            None,
            None,
            (device, password or replies[device]["mqtt_password"]),
        )

    a, b = login(a_id), login(b_id)
    server = Peer(
        password_broker,
        "srv-observer",
        None,
        None,
        ("edgefleet-server", cfg.server_password.read_text().strip()),
    )
    # An ingest process logs in with its own identity and takes reports from the share group.
    ingest_peer = Peer(
        password_broker,
        "ingest-observer",
        None,
        None,
        (ingest_identity(1), (cfg.directory / "ingest-1.password").read_text().strip()),
    )
    try:
        server.sub(Topics.all_devices("status"))
        ingest_peer.sub(Topics.shared("edgefleet-status", "status"))
        b.sub(Topics(b_id).desired)
        a.sub(Topics(b_id).desired)
        a.pub(Topics(b_id).status, b"forged")
        a.pub(Topics(a_id).status, b"mine")
        assert (Topics(b_id).status, b"forged") not in (got := server.got())
        assert (Topics(a_id).status, b"mine") in got
        assert (Topics(a_id).status, b"mine") in ingest_peer.got()
        server.pub(Topics(b_id).desired, b"doc-b")
        assert b.got() == [(Topics(b_id).desired, b"doc-b")]
        assert a.got() == []
    finally:
        for p in (a, b, server, ingest_peer):
            p.close()
    with pytest.raises(ConnectionRefusedError):
        login(a_id, "wrong-password")
    with pytest.raises(ConnectionRefusedError):
        Peer(password_broker, "anon", None, None)

    # A real agent enrolled now logs in with its password (its certificate is not asked for).
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, stack.admin_token)
        device = f"pagent-{uid}"
        token = api.post("/v1/enrollment-tokens", json={})["token"]
        agent = LocalAgent(root / "devices", device, "x86-64-avx2")
        agent.enroll(stack.url, token)
        os.kill(password_broker.process.pid, signal.SIGHUP)
        time.sleep(0.5)
        api.upload_model(model_path, "classifier", "1.0.0")
        agent.start()
        try:
            agent.wait_ready()
            api.post(
                "/v1/rollouts",
                json={"model": "classifier", "version": "1.0.0", "devices": [device]},
            )
            agent.wait_serving("classifier", "1.0.0")
        finally:
            agent.stop()
