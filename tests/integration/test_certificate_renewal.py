"""Device certificate renewal, under a short validity, with a real agent process and a real
Mosquitto running `edgefleet broker-config`'s mTLS configuration: the agent renews before
expiry and keeps working on the new certificate; a renewed certificate the broker refuses
leaves it connected on its old one; the server signs only a device's own request."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from sqlmodel import Session, select

from edge_agent.config import AgentConfig
from edge_agent.link.identity import new_key_and_csr
from fleet_server.broker import free_port
from fleet_server.client import ApiClient
from fleet_server.database import make_engine
from fleet_server.devices.tables import DeviceCertificate
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import LocalAgent, roll_out, wait_until
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_broker_acl import Broker, _start

pytestmark = pytest.mark.slow

#: The fleet's certificates last ten minutes (plus the five minutes they are backdated for
#: clock skew): the agent renews with 66 % of that left, a few seconds after enrollment.
VALIDITY_S = 600
RENEW_REMAINING = 0.66


@pytest.fixture
def mtls_broker() -> Iterator[Broker]:
    started = _start("mtls")
    broker = next(started)
    try:
        yield broker
    finally:
        started.close()


def _settings(broker: Broker) -> Settings:
    return Settings(
        data_dir=broker.config.directory.parent,  # its ca/ is the CA the broker trusts
        port=free_port(),  # one port across a restart: the agent was told this URL
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        mqtt_url=broker.config.url,
        mqtt_ca_file=broker.config.ca_cert,
        mqtt_cert_file=broker.config.server_cert,
        mqtt_key_file=broker.config.server_key,
        desired_resend_interval_s=0.2,
        device_certificate_validity_s=VALIDITY_S,
    )


def _enroll(stack: EmbeddedStack, api: ApiClient, root: Path, device_id: str) -> LocalAgent:
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(root, device_id, "x86-64-avx2")
    agent.enroll(stack.url, token)
    text = agent.config.read_text()
    assert "[mqtt]\n" in text and 'url = "mqtts://' in text, text
    agent.config.write_text(
        text.replace(
            "[mqtt]\n",
            f"[mqtt]\nrenew_remaining = {RENEW_REMAINING}\nrenew_check_s = 0.5\n",
            1,
        )
    )
    return agent


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _issued(settings: Settings, device_id: str) -> list[str]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session:
            rows = session.exec(
                select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
            ).all()
            return sorted(r.serial for r in rows)
    finally:
        engine.dispose()


def _expires(api: ApiClient, device_id: str) -> datetime:
    return datetime.fromisoformat(api.get(f"/v1/devices/{device_id}")["certificate_expires_at"])


def _online(api: ApiClient, device_id: str) -> bool:
    return bool(api.get(f"/v1/devices/{device_id}")["online"])


def test_the_agent_renews_before_expiry_and_works_on_the_new_certificate(
    mtls_broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    settings = _settings(mtls_broker)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        api.upload_model(model_path, "classifier", "1.0.0")
        agent = _enroll(stack, api, tmp_path / "devices", "renew-1")
        config = AgentConfig.load(agent.config)
        assert config.mqtt.cert_file is not None and config.mqtt.key_file is not None
        enrolled = _serial(config.mqtt.cert_file)
        agent.start()
        try:
            agent.wait_ready()
            wait_until(
                lambda: _serial(config.mqtt.cert_file) != enrolled,  # type: ignore[arg-type]
                60,
                "the agent to renew its certificate",
            )
            renewed = x509.load_pem_x509_certificate(config.mqtt.cert_file.read_bytes())
            assert format(renewed.serial_number, "x") in _issued(settings, "renew-1")
            assert renewed.subject.rfc4514_string() == "CN=renew-1"
            assert not list(config.mqtt.cert_file.parent.glob("*.new"))
            # The operator sees the new expiry: the agent reports the certificate it uses.
            wait_until(
                lambda: _expires(api, "renew-1") >= renewed.not_valid_after_utc,
                30,
                "the renewed certificate in the device's status",
            )
            # On the new certificate the device is reachable as before: a rollout reaches it
            # and its reports come back.
            wait_until(lambda: _online(api, "renew-1"), 30, "the device online")
            done = roll_out(api, "classifier", "1.0.0", ["renew-1"])
            assert done["state"] == "completed", done
            log = agent.log_path.read_text()
            assert "now connected with the renewed certificate" in log, log[-3000:]
        finally:
            agent.stop()


def test_a_renewal_the_broker_refuses_leaves_the_device_on_its_old_certificate(
    mtls_broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    """The server's CA is replaced by one the broker does not trust yet (a CA moved to a new
    host without the broker's `cafile`): the renewed certificate is refused at the broker's
    TLS handshake, and the device goes on with the certificate it has."""
    settings = _settings(mtls_broker)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        api.upload_model(model_path, "classifier", "1.0.0")
        agent = _enroll(stack, api, tmp_path / "devices", "renew-2")
    shutil.rmtree(settings.ca_dir)  # the next start makes a CA the broker has never seen
    config = AgentConfig.load(agent.config)
    assert config.mqtt.cert_file is not None and config.mqtt.key_file is not None
    enrolled = config.mqtt.cert_file.read_bytes()
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        agent.start()
        try:
            agent.wait_ready()
            wait_until(
                lambda: "did not accept the new certificate" in agent.log_path.read_text(),
                90,
                "a renewal the broker refuses",
            )
            assert len(_issued(settings, "renew-2")) >= 2  # the server did sign one
            assert config.mqtt.cert_file.read_bytes() == enrolled
            # The operator sees the expiry of the certificate in use, not of those issued.
            old = x509.load_pem_x509_certificate(enrolled).not_valid_after_utc
            wait_until(lambda: _expires(api, "renew-2") == old, 30, "the old certificate shown")
            # The connection made with the old certificate was never dropped.
            log = agent.log_path.read_text()
            assert log.count("connected to ") == 1 and "disconnected" not in log, log[-3000:]
            assert not list(config.mqtt.cert_file.parent.glob("*.new"))
            # Still connected with the old certificate: a rollout reaches the device.
            wait_until(lambda: _online(api, "renew-2"), 30, "the device online")
            done = roll_out(api, "classifier", "1.0.0", ["renew-2"])
            assert done["state"] == "completed", done
        finally:
            agent.stop()


def test_the_server_signs_only_a_device_s_own_request(mtls_broker: Broker, tmp_path: Path) -> None:
    settings = _settings(mtls_broker)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        secrets = {}
        for device in ("own-a", "own-b"):
            token = api.post("/v1/enrollment-tokens", json={})["token"]
            _, csr = new_key_and_csr(device)
            r = httpx.post(
                f"{stack.url}/v1/devices/enroll",
                json={"token": token, "device_id": device, "profile": "x86-64-avx2", "csr": csr},
            )
            assert r.status_code == 201, r.text
            secrets[device] = r.json()["device_secret"]

        def renew(as_device: str, path_device: str, csr: str) -> httpx.Response:
            return httpx.post(
                f"{stack.url}/v1/devices/{path_device}/certificate",
                json={"csr": csr},
                headers={"Authorization": f"Bearer {secrets[as_device]}"},
            )

        before = {d: _issued(settings, d) for d in secrets}
        _, csr_b = new_key_and_csr("own-b")
        # A CSR for another device, through one's own path: refused, naming the CN.
        r = renew("own-a", "own-a", csr_b)
        assert r.status_code == 422 and "CN=own-a" in r.json()["error"]["message"], r.text
        # Another device's path: refused whatever the CSR.
        r = renew("own-a", "own-b", csr_b)
        assert r.status_code == 403, r.text
        # An operator token is not a device.
        r = httpx.post(
            f"{stack.url}/v1/devices/own-a/certificate",
            json={"csr": new_key_and_csr("own-a")[1]},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert r.status_code == 403, r.text
        r = renew("own-a", "own-a", "not a certificate request")
        assert r.status_code == 422, r.text
        assert {d: _issued(settings, d) for d in secrets} == before  # nothing was issued

        r = renew("own-a", "own-a", new_key_and_csr("own-a")[1])
        assert r.status_code == 200, r.text
        body = r.json()
        cert = x509.load_pem_x509_certificate(body["client_cert"].encode())
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert VALIDITY_S <= lifetime.total_seconds() <= VALIDITY_S + 600
        assert body["serial"] in _issued(settings, "own-a")
        audit = api.get("/v1/audit", params={"action": "device.certificate.renew"})
        assert any(e["target"] == "own-a" for e in audit), audit
        assert api.get("/v1/devices/own-a")["certificate_expires_at"] is not None
        # A decommissioned device cannot renew (its credential is revoked), and has no valid
        # certificate left.
        api.post("/v1/devices/own-a/decommission", json={"reason": "test"})
        assert api.get("/v1/devices/own-a")["certificate_expires_at"] is None
        r = renew("own-a", "own-a", new_key_and_csr("own-a")[1])
        assert r.status_code == 401, r.text


def _expired_certificate(settings: Settings, cert_file: Path, key_file: Path) -> None:
    """Replace the device's certificate with one for the same key that expired yesterday
    (the device sat in a drawer past its certificate's lifetime)."""
    from cryptography.hazmat.primitives import hashes, serialization

    from fleet_server.auth.ca import FleetCA

    ca = FleetCA.load_or_create(settings.ca_dir)
    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    now = datetime.now(UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=400))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    cert_file.write_bytes(expired.public_bytes(serialization.Encoding.PEM))


def test_a_device_back_after_its_certificate_expired_renews_and_reconnects(
    mtls_broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    """No connection can be made with an expired certificate, but the device's credential
    still works at the server: the agent renews first, then connects."""
    settings = _settings(mtls_broker)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        api.upload_model(model_path, "classifier", "1.0.0")
        agent = _enroll(stack, api, tmp_path / "devices", "renew-3")
        config = AgentConfig.load(agent.config)
        assert config.mqtt.cert_file is not None and config.mqtt.key_file is not None
        _expired_certificate(settings, config.mqtt.cert_file, config.mqtt.key_file)
        expired = _serial(config.mqtt.cert_file)
        agent.start()
        try:
            agent.wait_ready()
            wait_until(lambda: _online(api, "renew-3"), 60, "the device online again")
            assert _serial(config.mqtt.cert_file) != expired
            # A status made before the renewal (with the expired certificate) may reach the
            # server first, queued while the device was offline: the renewed one follows.
            wait_until(
                lambda: _expires(api, "renew-3") > datetime.now(UTC),
                30,
                "the device to report its renewed certificate",
            )
            done = roll_out(api, "classifier", "1.0.0", ["renew-3"])
            assert done["state"] == "completed", done
            assert "now connected with the renewed certificate" in agent.log_path.read_text()
        finally:
            agent.stop()
