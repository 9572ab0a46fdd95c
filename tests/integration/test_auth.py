"""REST authorization on a real server and database: every endpoint needs a token (401), roles
limit what a token may do (403), a device credential acts only as its device, and the audit
log records who did what — and nothing for what was refused."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from hil.rig import wait_until
from tests.integration.test_api import enroll
from tests.integration.test_rollouts import notified

#: Endpoints that are deliberately open.
PUBLIC = {("GET", "/healthz"), ("POST", "/v1/devices/enroll")}
SAMPLE = {"{name}": "classifier", "{version}": "1.0.0", "{device_id}": "d1",
          "{rollout_id}": "r1", "{sha256}": "0" * 64, "{token_id}": "1"}  # fmt: skip


def endpoints(stack: EmbeddedStack) -> list[tuple[str, str]]:
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    found = []
    for path, ops in spec["paths"].items():
        for method in ops:
            concrete = path
            for k, v in SAMPLE.items():
                concrete = concrete.replace(k, v)
            found.append((method.upper(), concrete))
    return found


def call(stack: EmbeddedStack, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(
        method, f"{stack.url}{path}", headers=headers, json={} if method != "GET" else None
    )


def test_every_endpoint_refuses_a_missing_or_bad_token(stack: EmbeddedStack) -> None:
    checked = 0
    for method, path in endpoints(stack):
        if (method, path) in PUBLIC:
            continue
        for token in (None, "efa_not-a-real-token", "efd_not-a-device"):
            r = call(stack, method, path, token)
            assert r.status_code == 401, (method, path, token, r.status_code)
            assert r.json()["error"]["code"] == "unauthenticated"
        checked += 1
    assert checked >= 15


def test_a_viewer_cannot_write(api: ApiClient, stack: EmbeddedStack) -> None:
    viewer = api.post("/v1/tokens", json={"name": "dashboards", "role": "viewer"})["token"]
    writes = [(m, p) for m, p in endpoints(stack) if m != "GET" and (m, p) not in PUBLIC]
    assert len(writes) >= 6
    for method, path in writes:
        r = call(stack, method, path, viewer)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "forbidden"
    assert call(stack, "GET", "/v1/models", viewer).status_code == 200
    assert call(stack, "GET", "/v1/audit", viewer).status_code == 403  # admin only
    assert call(stack, "GET", "/v1/tokens", viewer).status_code == 403


def test_operator_deploys_but_does_not_manage_tokens_or_keys(
    api: ApiClient, stack: EmbeddedStack, model_path: Path
) -> None:
    operator = ApiClient(
        stack.url, api.post("/v1/tokens", json={"name": "ci", "role": "operator"})["token"]
    )
    operator.upload_model(model_path, "classifier", "1.0.0")
    enroll(operator, "op-dev")
    operator.post(
        "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "devices": ["op-dev"]}
    )
    for method, path, body in (
        ("POST", "/v1/tokens", {"name": "x", "role": "admin"}),
        ("POST", "/v1/keys/online", {}),
        ("PUT", "/v1/keyring", {"root_public_key": "x", "keyring": {}}),
    ):
        with pytest.raises(ApiError) as e:
            operator.request(method, path, json=body)
        assert e.value.status == 403, path


def test_revoked_tokens_stop_working(api: ApiClient, stack: EmbeddedStack) -> None:
    created = api.post("/v1/tokens", json={"name": "temp", "role": "viewer"})
    assert call(stack, "GET", "/v1/models", created["token"]).status_code == 200
    api.request("DELETE", f"/v1/tokens/{created['id']}")
    assert call(stack, "GET", "/v1/models", created["token"]).status_code == 401
    listed = {t["id"]: t for t in api.get("/v1/tokens")}
    assert listed[created["id"]]["revoked_at"] is not None
    assert "token" not in listed[created["id"]]


def test_a_device_acts_only_as_itself(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, model_v2_path: Path
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    api.upload_model(model_v2_path, "classifier", "2.0.0")
    a = enroll(api, "dev-a")["device_secret"]
    b = enroll(api, "dev-b", profile="raspberry-pi-4")["device_secret"]
    ra = api.post(
        "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "devices": ["dev-a"]}
    )
    rb = api.post(
        "/v1/rollouts", json={"model": "classifier", "version": "2.0.0", "devices": ["dev-b"]}
    )
    sha_a, sha_b = ra["targets"][0]["bundle_sha256"], rb["targets"][0]["bundle_sha256"]
    # A device may fetch a bundle once it was assigned it: when the engine notifies it.
    for rollout in (ra, rb):
        wait_until(lambda r=rollout: notified(api, r["id"], 0, 1), 30, "the device notified")
    assert call(stack, "GET", f"/v1/bundles/{sha_a}", a).status_code == 200
    assert call(stack, "GET", f"/v1/bundles/{sha_b}", b).status_code == 200
    r = call(stack, "GET", f"/v1/bundles/{sha_b}", a)
    assert r.status_code == 403 and "not assigned" in r.json()["error"]["message"]
    # A device credential is not an API token: nothing else is open to it.
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/v1/devices/dev-a"),
        ("GET", "/v1/devices/dev-b"),
        ("POST", "/v1/rollouts"),
        ("GET", f"/v1/bundles/{sha_a}/manifest"),
    ):
        assert call(stack, method, path, a).status_code == 403, path
    # An earlier assignment stays downloadable (a rollback needs it).
    again = api.post(
        "/v1/rollouts",
        json={
            "model": "classifier",
            "version": "2.0.0",
            "devices": ["dev-a"],
            "supersedes": ra["id"],
        },
    )
    wait_until(lambda: notified(api, again["id"], 0, 1), 30, "dev-a notified of 2.0.0")
    assert call(stack, "GET", f"/v1/bundles/{sha_a}", a).status_code == 200

    # A database from before bundle grants existed: its rollouts' bundles are granted again
    # when the server starts (backfilled from the rollout history), so rollbacks still work.
    from sqlmodel import Session, delete

    from fleet_server.database import make_engine
    from fleet_server.devices.tables import BundleGrant
    from fleet_server.rollouts.service import backfill_bundle_grants

    engine = make_engine(stack.settings.resolved_database_url)
    with Session(engine) as session:
        session.exec(delete(BundleGrant))  # type: ignore[call-overload]
        session.commit()
        assert call(stack, "GET", f"/v1/bundles/{sha_a}", a).status_code == 403
        assert backfill_bundle_grants(session) == 3  # dev-a: 1.0.0 and 2.0.0; dev-b: 2.0.0
        assert backfill_bundle_grants(session) == 0
    engine.dispose()
    assert call(stack, "GET", f"/v1/bundles/{sha_a}", a).status_code == 200
    assert call(stack, "GET", f"/v1/bundles/{sha_b}", b).status_code == 200


def test_the_audit_log_records_who_did_what(
    api: ApiClient, stack: EmbeddedStack, model_path: Path
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    with pytest.raises(ApiError):
        api.upload_model(model_path, "classifier", "1.0.0")  # refused: no entry
    enroll(api, "aud-1")
    rollout = api.post(
        "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "devices": ["aud-1"]}
    )
    events = api.get("/v1/audit")
    actions = [e["action"] for e in events]
    assert actions.count("model.upload") == 1
    assert {"enrollment_token.create", "device.enroll", "rollout.create"} <= set(actions)
    upload = next(e for e in events if e["action"] == "model.upload")
    assert upload["actor"] == "bootstrap-admin" and upload["target"] == "classifier 1.0.0"
    enrolled = next(e for e in events if e["action"] == "device.enroll")
    assert enrolled["actor"] == "device:aud-1"
    only = api.get("/v1/audit", params={"action": "rollout"})
    assert [e["target"] for e in only] == [rollout["id"]]
    assert only[0]["detail"]["devices"] == ["aud-1"]
