"""Decommissioning a device: its credential and certificate revoked at the server and at a
real Mosquitto running `edgefleet broker-config`'s mTLS configuration (CRL and ACL rewritten,
the broker reloaded), its retained messages cleared, its cohorts left, its history kept; the
other devices go on working; enrolling it again takes a new token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlmodel import Session, select

from edge_agent.link.identity import new_key_and_csr
from edge_agent.protocol import Topics
from fleet_server.auth.broker_files import revoked_serials
from fleet_server.client import ApiClient, ApiError
from fleet_server.database import make_engine
from fleet_server.devices.tables import Device, DeviceCertificate
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from hil.rig import wait_until
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_broker_acl import Broker, Peer, _start


@dataclass
class Enrolled:
    device_id: str
    secret: str
    cert: Path
    key: Path
    serial: int


def enroll(stack: EmbeddedStack, api: ApiClient, certs: Path, device_id: str,
           token: str | None = None) -> Enrolled:  # fmt: skip
    """What `edge-agent enroll` does on an mTLS fleet: a key here, a CSR sent with the token."""
    token = token or api.post("/v1/enrollment-tokens", json={})["token"]
    key_pem, csr = new_key_and_csr(device_id)
    r = httpx.post(
        f"{stack.url}/v1/devices/enroll",
        json={"token": token, "device_id": device_id, "profile": "x86-64-avx2", "csr": csr},
    )
    if r.status_code != 201:
        raise ApiError(r.status_code, r.json()["error"]["code"], r.json()["error"]["message"])
    reply = r.json()
    certs.mkdir(exist_ok=True)
    cert_path, key_path = certs / f"{device_id}.crt", certs / f"{device_id}.key"
    cert_path.write_text(reply["client_cert"])
    key_path.write_bytes(key_pem)
    serial = x509.load_pem_x509_certificate(reply["client_cert"].encode()).serial_number
    return Enrolled(device_id, reply["device_secret"], cert_path, key_path, serial)


def edgefleet(stack: EmbeddedStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_TOKEN": ADMIN_TOKEN, "EDGEFLEET_SERVER": stack.url,
           "COLUMNS": "200"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", *args],
        capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def authenticated(stack: EmbeddedStack, secret: str) -> bool:
    """Whether a device's own REST call (a bundle) gets past authentication (an unknown
    bundle is then a 404)."""
    r = httpx.get(f"{stack.url}/v1/bundles/{'0' * 64}",
                  headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
    assert r.status_code in (401, 404), r.text
    return r.status_code == 404


def identity(broker: Broker, name: str) -> tuple[Path, Path]:
    """One of the server's ingest identities (free here: the stack runs no ingest process),
    for a watcher that must not take the server's own session over."""
    return (
        broker.config.directory / f"{name}-client.crt",
        broker.config.directory / f"{name}-client.key",
    )


@pytest.fixture
def secured_fleet() -> Iterator[tuple[Broker, EmbeddedStack, ApiClient]]:
    started = _start("mtls")
    broker = next(started)
    assert broker.process is not None and broker.config.crl_file is not None
    settings = Settings(
        data_dir=broker.config.directory.parent,  # its ca/ is the CA the broker trusts
        port=0,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        mqtt_url=broker.config.url,
        mqtt_ca_file=broker.config.ca_cert,
        mqtt_cert_file=broker.config.server_cert,
        mqtt_key_file=broker.config.server_key,
        broker_crl_file=broker.config.crl_file,
        broker_acl_file=broker.config.acl,
        broker_reload_command=f"kill -HUP {broker.process.pid}",
        desired_resend_interval_s=0.2,
    )
    try:
        with EmbeddedStack(settings) as stack:
            yield broker, stack, ApiClient(stack.url, ADMIN_TOKEN)
    finally:
        started.close()


def test_a_decommissioned_device_is_cut_off_at_the_broker_and_the_server(
    secured_fleet: tuple[Broker, EmbeddedStack, ApiClient],
) -> None:
    broker, stack, api = secured_fleet
    token_a = api.post("/v1/enrollment-tokens", json={})["token"]
    a = enroll(stack, api, broker.certs, "dev-a", token=token_a)
    b = enroll(stack, api, broker.certs, "dev-b")
    wait_until(lambda: api.get("/healthz")["broker_connected"], 10, "the server on the broker")
    pa, pb = Peer(broker, "dev-a", a.cert, a.key), Peer(broker, "dev-b", b.cert, b.key)
    peers = [pa, pb]
    try:
        for peer, device in ((pa, "dev-a"), (pb, "dev-b")):
            # Retained, as the agent's online flag and last status are.
            peer.client.publish(
                Topics(device).online, b"online", qos=1, retain=True
            ).wait_for_publish(5)
            peer.sub(Topics(device).desired)
        assert authenticated(stack, a.secret) and authenticated(stack, b.secret)

        done = edgefleet(stack, "devices", "decommission", "dev-a", "--yes", "--reason", "lost")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 certificate(s) revoked" in done.stdout and "(reloaded)" in done.stdout
        assert "retained messages cleared" in done.stdout

        # The server: its credential is dead; its row and history stay.
        assert not authenticated(stack, a.secret)
        assert authenticated(stack, b.secret)
        shown = api.get("/v1/devices/dev-a")
        assert shown["decommissioned_at"] is not None
        assert revoked_serials(broker.config.crl_file) == {a.serial}  # type: ignore[arg-type]
        assert "user dev-a\ntopic deny #" in broker.config.acl.read_text()

        # The clearing of its retained document may reach it (empty) before the reload does.
        assert {m for m in pa.got(0.5)} <= {(Topics("dev-a").desired, b"")}
        # The broker: its live connection carries nothing any more, and no new one is let in.
        watcher = Peer(broker, "edgefleet-ingest-1", *identity(broker, "ingest-1"))
        peers.append(watcher)
        watcher.sub("edgefleet/v1/devices/+/status")
        pa.pub(Topics("dev-a").status, b"{}")
        pb.pub(Topics("dev-b").status, b"{}")
        assert [t for t, _ in watcher.got(1.0)] == [Topics("dev-b").status]
        watcher.pub(Topics("dev-a").desired, b"for a")
        watcher.pub(Topics("dev-b").desired, b"for b")
        assert pa.got(0.5) == [] and pb.got(1.0) == [(Topics("dev-b").desired, b"for b")]
        with pytest.raises(ConnectionRefusedError):
            peers.append(Peer(broker, "dev-a", a.cert, a.key))
        peers.append(Peer(broker, "dev-b", b.cert, b.key))  # the others still connect

        # Nothing retained for it: a new subscriber to its topics gets nothing.
        late = Peer(broker, "edgefleet-ingest-2", *identity(broker, "ingest-2"))
        peers.append(late)
        late.sub("edgefleet/v1/devices/dev-a/#")
        late.sub(Topics("dev-b").online)
        assert late.got(1.0) == [(Topics("dev-b").online, b"online")]  # B's is still there

        # Again: refused, naming why; unknown: refused in one line.
        again = edgefleet(stack, "devices", "decommission", "dev-a", "--yes")
        assert again.returncode == 1 and "was decommissioned at" in again.stderr
        unknown = edgefleet(stack, "devices", "decommission", "nobody", "--yes")
        assert unknown.returncode == 1
        assert unknown.stderr.strip().splitlines() == [
            "error: no device 'nobody' is enrolled (edgefleet devices list)"
        ]

        # The same hardware again: not with a used token; with a new one, a new identity that
        # the broker lets in (its deny block gone) and its old certificate still refused.
        with pytest.raises(ApiError) as e:
            enroll(stack, api, broker.certs / "again", "dev-a", token=token_a)
        assert e.value.status == 401 and "already used" in e.value.message
        a2 = enroll(stack, api, broker.certs / "again", "dev-a")
        assert a2.serial != a.serial and authenticated(stack, a2.secret)
        assert "dev-a" not in broker.config.acl.read_text()
        assert revoked_serials(broker.config.crl_file) == {a.serial}  # type: ignore[arg-type]
        pa2 = Peer(broker, "dev-a", a2.cert, a2.key)
        peers.append(pa2)
        pa2.pub(Topics("dev-a").status, b"{}")
        assert [t for t, _ in watcher.got(1.0)] == [Topics("dev-a").status]
        assert api.get("/v1/devices/dev-a")["decommissioned_at"] is None
    finally:
        for peer in peers:
            peer.close()


def _settings_with_files(settings: Settings, tmp_path: Path, reload: str = "true") -> Settings:
    from fleet_server.auth.broker_acl import acl_text
    from fleet_server.auth.broker_files import revocation_list
    from fleet_server.auth.ca import FleetCA

    broker = tmp_path / "broker"
    broker.mkdir()
    ca = FleetCA.load_or_create(settings.ca_dir)
    (broker / "crl.pem").write_bytes(revocation_list(ca, []))
    (broker / "acl").write_text(acl_text())
    return settings.model_copy(
        update={
            "broker_crl_file": broker / "crl.pem",
            "broker_acl_file": broker / "acl",
            "broker_reload_command": reload,
        }
    )


def _rows(stack: EmbeddedStack, device_id: str) -> tuple[Any, list[Any]]:
    engine = make_engine(stack.settings.resolved_database_url)
    try:
        with Session(engine) as session:
            device = session.get(Device, device_id)
            certs = session.exec(
                select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
            ).all()
            return device, list(certs)
    finally:
        engine.dispose()


def test_decommissioning_releases_the_device_from_its_rollouts_and_keeps_its_history(
    settings: Settings, tmp_path: Path, model_path: Path
) -> None:
    settings = _settings_with_files(settings, tmp_path)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        api.upload_model(model_path, "classifier", "1.0.0")
        for device in ("cam-1", "cam-2"):
            token = api.post("/v1/enrollment-tokens", json={"labels": {"site": "x"}})["token"]
            enroll(stack, api, tmp_path / "certs", device, token=token)
        rollout = api.post(
            "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "selector": "site=x"}
        )
        wait_until(lambda: len(api.get(f"/v1/rollouts/{rollout['id']}")["targets"]) == 2, 30,
                   "both devices targeted")  # fmt: skip
        done = api.post("/v1/devices/cam-1/decommission", json={"reason": "sold"})
        assert done["certificates_revoked"] == 1 and done["broker_reloaded"] is True
        assert done["warnings"] == [] and len(done["broker_files"]) == 2

        def phase(device: str) -> str:
            targets = api.get(f"/v1/rollouts/{rollout['id']}")["targets"]
            return str(next(t for t in targets if t["device_id"] == device)["state"])

        wait_until(lambda: phase("cam-1") == "released", 30, "cam-1 released by the engine")
        assert phase("cam-2") != "released"
        # Cohorts leave it out: by selector and by name.
        with pytest.raises(ApiError) as e:
            api.post("/v1/rollouts",
                     json={"model": "classifier", "version": "1.0.0", "devices": ["cam-1"],
                           "slot": "other"})  # fmt: skip
        assert e.value.status == 404 and "decommissioned" in e.value.message
        device, certs = _rows(stack, "cam-1")
        assert device is not None and device.decommissioned_at is not None
        assert device.mqtt_password_hash is None
        assert [c.revoked_at is not None for c in certs] == [True]
        events = api.get("/v1/audit", params={"action": "device.decommission"})
        assert [(e["target"], e["detail"]["reason"]) for e in events] == [("cam-1", "sold")]
        assert any(r["device_id"] == "cam-1" for r in
                   api.get(f"/v1/rollouts/{rollout['id']}")["targets"])  # fmt: skip


def test_a_decommission_whose_broker_files_cannot_be_written_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    settings = _settings_with_files(settings, tmp_path)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        secret = enroll(stack, api, tmp_path / "certs", "cam-1").secret
        crl_before = settings.broker_crl_file.read_bytes()  # type: ignore[union-attr]
        acl = settings.broker_acl_file
        assert acl is not None
        acl.unlink()
        acl.mkdir()  # the ACL's path is now a directory: it cannot be written
        with pytest.raises(ApiError) as e:
            api.post("/v1/devices/cam-1/decommission", json={})
        assert e.value.status == 503 and "nothing was changed" in e.value.message
        device, certs = _rows(stack, "cam-1")
        assert device is not None and device.decommissioned_at is None
        assert [c.revoked_at for c in certs] == [None]
        assert authenticated(stack, secret)
        # The CRL, written before the ACL failed, is back to naming nobody.
        assert revoked_serials(settings.broker_crl_file) == set()  # type: ignore[arg-type]
        assert crl_before  # (the bytes may differ: a CRL is signed anew)
        assert api.get("/v1/audit", params={"action": "device.decommission"}) == []


def test_a_failed_broker_reload_is_reported_and_the_command_exits_1(
    settings: Settings, tmp_path: Path
) -> None:
    settings = _settings_with_files(settings, tmp_path, reload="false")
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        enroll(stack, api, tmp_path / "certs", "cam-1")
        done = edgefleet(stack, "devices", "decommission", "cam-1", "--yes", "--json")
        assert done.returncode == 1
        reply = json.loads(done.stdout)
        assert reply["broker_reloaded"] is False and reply["decommissioned_at"]
        last = done.stderr.strip().splitlines()
        assert len(last) == 1 and last[0].startswith("error: cam-1 is decommissioned, but")
        assert "'false' exited 1" in last[0]


def test_the_server_rewrites_the_broker_files_from_the_database_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    """A crash between the commit and the files, or a restored backup: the start repairs it."""
    settings = _settings_with_files(settings, tmp_path)
    with EmbeddedStack(settings) as stack:
        api = ApiClient(stack.url, ADMIN_TOKEN)
        serial = enroll(stack, api, tmp_path / "certs", "cam-1").serial
        api.post("/v1/devices/cam-1/decommission", json={})
    assert settings.broker_acl_file is not None and settings.broker_crl_file is not None
    settings.broker_acl_file.write_text("# someone's old copy\n")
    settings.broker_crl_file.unlink()
    time.sleep(0.1)
    with EmbeddedStack(settings):
        assert "user cam-1\ntopic deny #" in settings.broker_acl_file.read_text()
        assert revoked_serials(settings.broker_crl_file) == {serial}
