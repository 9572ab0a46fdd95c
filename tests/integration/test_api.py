"""The REST API on a real database (SQLite, and PostgreSQL when configured), real HTTP and a
real broker. Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlmodel import Session, func, select

from fleet_server.bundles.tables import Bundle
from fleet_server.client import ApiClient, ApiError
from fleet_server.database import make_engine
from fleet_server.devices.tables import DesiredStateRecord, Device
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.tables import Rollout
from fleet_server.server import EmbeddedStack
from hil.rig import wait_until


def count(stack: EmbeddedStack, table: type) -> int:
    engine = make_engine(stack.settings.resolved_database_url)
    with Session(engine) as s:
        n = s.exec(select(func.count()).select_from(table)).one()
    engine.dispose()
    return int(n)


def artifacts(stack: EmbeddedStack) -> list[Path]:
    return sorted(p for p in (stack.settings.artifacts_dir / "sha256").rglob("*") if p.is_file())


def enroll(api: ApiClient, device_id: str, profile: str = "x86-64-avx2", **labels: str) -> dict:  # type: ignore[type-arg]
    token = api.post("/v1/enrollment-tokens", json={"labels": labels})["token"]
    return api.post(
        "/v1/devices/enroll", json={"token": token, "device_id": device_id, "profile": profile}
    )


def test_upload_records_inputs_and_outputs(api: ApiClient, model_path: Path) -> None:
    v = api.upload_model(model_path, "classifier", "1.0.0", "first")
    assert v["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert v["outputs"] == [{"name": "probs", "dtype": "float32", "shape": ["batch", 4]}]
    assert v["opset"] == 17 and v["size"] == model_path.stat().st_size
    listed = api.get("/v1/models")
    assert [m["name"] for m in listed] == ["classifier"]
    assert api.get("/v1/models/classifier/versions/1.0.0")["source_sha256"] == v["source_sha256"]


@pytest.mark.parametrize(
    ("name", "version", "content", "code", "needle"),
    [
        ("clf", "1.0.0", b"hello, I am a text file", "invalid_input", "ONNX"),
        ("clf", "1.0.0", None, "invalid_input", "ONNX"),  # truncated ONNX
        ("clf", "1.0.0", b"", "invalid_input", "empty"),
        ("clf", "v1", b"x", "invalid_input", "semantic version"),
        ("Bad Name", "1.0.0", b"x", "invalid_input", "model name"),
    ],
)
def test_bad_uploads_are_refused_and_store_nothing(
    api: ApiClient,
    stack: EmbeddedStack,
    model_path: Path,
    tmp_path: Path,
    name: str,
    version: str,
    content: bytes | None,
    code: str,
    needle: str,
) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(
        model_path.read_bytes()[: model_path.stat().st_size // 2] if content is None else content
    )
    with pytest.raises(ApiError) as e:
        api.upload_model(bad, name, version)
    assert e.value.status == 422 and e.value.reason == code
    assert needle in e.value.message
    assert count(stack, MLModel) == 0 and count(stack, ModelVersion) == 0
    assert artifacts(stack) == []


def test_the_server_process_never_parses_an_uploaded_model(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model and its sets are read in a child process (their memory is not the server's
    for good): parsing them here fails the test."""
    import onnx

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the server process parsed the model")

    monkeypatch.setattr(onnx, "load", refuse)
    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    monkeypatch.setattr(np, "load", refuse)
    calibration = model_path.with_suffix(".npz")
    np.savez(calibration, x=np.zeros((8, 1, 16), np.float32))
    v = api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)
    assert v["calibration_samples"] == 8 and v["inputs"][0]["shape"] == ["batch", 16]
    stored = {p.name for p in artifacts(stack)}
    assert stored == {v["source_sha256"], v["calibration_sha256"]}  # hashed on the way in
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == v["source_sha256"]


def test_an_upload_whose_inspector_dies_is_refused_and_stores_nothing(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that crashes the ONNX parser (or a host out of memory) kills only the child."""
    from converters.onnx import isolated

    monkeypatch.setattr(
        isolated,
        "COMMAND",
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
    )
    with pytest.raises(ApiError) as e:
        api.upload_model(model_path, "classifier", "1.0.0")
    assert e.value.status == 422 and "inspector died (signal 9" in e.value.message
    assert count(stack, MLModel) == 0 and count(stack, ModelVersion) == 0
    assert artifacts(stack) == []
    assert api.get("/healthz")["status"] == "ok"


def test_duplicate_version_conflicts_and_keeps_the_original(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, model_v2_path: Path
) -> None:
    first = api.upload_model(model_path, "classifier", "1.0.0")
    with pytest.raises(ApiError) as e:
        api.upload_model(model_v2_path, "classifier", "1.0.0")
    assert e.value.status == 409 and "already exists" in e.value.message
    assert (
        api.get("/v1/models/classifier/versions/1.0.0")["source_sha256"] == first["source_sha256"]
    )
    assert len(artifacts(stack)) == 1


def test_requests_without_a_valid_token_are_refused(stack: EmbeddedStack) -> None:
    for headers in ({}, {"Authorization": "Bearer efa_wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.get(f"{stack.url}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthenticated"
        assert r.headers["www-authenticate"] == "Bearer"


def test_enrollment(api: ApiClient, stack: EmbeddedStack) -> None:
    token = api.post(
        "/v1/enrollment-tokens", json={"profile": "raspberry-pi-5", "labels": {"site": "a"}}
    )["token"]
    # Wrong profile for this token, unknown profile: refused, token not consumed.
    for profile, status in (("x86-64-avx2", 422), ("commodore-64", 422)):
        r = httpx.post(
            f"{stack.url}/v1/devices/enroll",
            json={"token": token, "device_id": "pi-1", "profile": profile},
        )
        assert r.status_code == status, r.text
    assert count(stack, Device) == 0
    r = httpx.post(
        f"{stack.url}/v1/devices/enroll",
        json={"token": token, "device_id": "pi-1", "profile": "raspberry-pi-5"},
    )
    assert r.status_code == 201
    reply = r.json()
    assert reply["device_secret"].startswith("efd_") and reply["mqtt_url"] == stack.mqtt_url
    assert reply["server_url"] == stack.url
    # Single use.
    r = httpx.post(
        f"{stack.url}/v1/devices/enroll",
        json={"token": token, "device_id": "pi-2", "profile": "raspberry-pi-5"},
    )
    assert r.status_code == 401 and "already used" in r.json()["error"]["message"]
    device = api.get("/v1/devices/pi-1")
    assert device["labels"] == {"site": "a"} and device["profile"] == "raspberry-pi-5"
    # Duplicate id with a fresh token.
    with pytest.raises(ApiError) as e:
        enroll(api, "pi-1")
    assert e.value.status == 409
    # Bad device id.
    token2 = api.post("/v1/enrollment-tokens", json={})["token"]
    r = httpx.post(
        f"{stack.url}/v1/devices/enroll",
        json={"token": token2, "device_id": "bad/id", "profile": "raspberry-pi-5"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    # The body is the agent's own struct, decoded by msgspec: every refusal names its field,
    # and spends nothing (the token enrolls a device afterwards).
    good = {"token": token2, "device_id": "pi-3", "profile": "raspberry-pi-5"}
    for body, where in (
        ({**good, "device_id": "pi-3\n"}, "body.device_id"),  # $ would match before \n
        ({**good, "labels": {"site": 1}}, "body.labels"),
        ({**good, "extra": True}, "body.extra"),
        ({"token": token2, "profile": "raspberry-pi-5"}, "body"),
    ):
        r = httpx.post(f"{stack.url}/v1/devices/enroll", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"].startswith(f"{where}:"), r.text
    r = httpx.post(
        f"{stack.url}/v1/devices/enroll",
        content=b'{"token": ',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert count(stack, Device) == 1
    assert httpx.post(f"{stack.url}/v1/devices/enroll", json=good).status_code == 201


def test_devices_racing_with_one_token_enroll_one_device(
    api: ApiClient, stack: EmbeddedStack
) -> None:
    """The token is claimed by an UPDATE that only an unused token matches: of eight devices
    sending the same token at once, one enrolls and seven are told it was used."""
    from concurrent.futures import ThreadPoolExecutor

    token = api.post("/v1/enrollment-tokens", json={})["token"]
    barrier = threading.Barrier(8)

    def attempt(i: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(
            f"{stack.url}/v1/devices/enroll",
            json={"token": token, "device_id": f"race-{i}", "profile": "x86-64-avx2"},
            timeout=60,
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(attempt, range(8)))
    assert sorted(r.status_code for r in replies) == [201] + [401] * 7, [r.text for r in replies]
    assert all(
        "already used" in r.json()["error"]["message"] for r in replies if r.status_code == 401
    )
    assert count(stack, Device) == 1


def test_a_taken_device_id_leaves_the_token_unused_and_an_enrollment_is_audited(
    api: ApiClient, stack: EmbeddedStack
) -> None:
    enroll(api, "cam-1")
    token = api.post("/v1/enrollment-tokens", json={})["token"]
    r = httpx.post(f"{stack.url}/v1/devices/enroll",
                   json={"token": token, "device_id": "cam-1", "profile": "x86-64-avx2"})  # fmt: skip
    assert r.status_code == 409 and "cam-1" in r.json()["error"]["message"]
    r = httpx.post(f"{stack.url}/v1/devices/enroll",
                   json={"token": token, "device_id": "cam-2", "profile": "x86-64-avx2"})  # fmt: skip
    assert r.status_code == 201, r.text  # the refused attempt did not use the token up
    events = api.get("/v1/audit", params={"action": "device.enroll"})
    assert sorted(e["target"] for e in events) == ["cam-1", "cam-2"]
    assert all(e["actor"] == f"device:{e['target']}" for e in events)


def test_enrollment_token_with_unknown_profile_is_refused(api: ApiClient) -> None:
    with pytest.raises(ApiError) as e:
        api.post("/v1/enrollment-tokens", json={"profile": "commodore-64"})
    assert e.value.status == 422 and "known profiles" in e.value.message


def test_rollout_to_unenrolled_device_changes_nothing(
    api: ApiClient, stack: EmbeddedStack, model_path: Path
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    enroll(api, "cam-1")
    with pytest.raises(ApiError) as e:
        api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "devices": ["cam-1", "ghost"]},
        )
    assert e.value.status == 404 and "ghost" in e.value.message
    assert count(stack, Rollout) == 0 and count(stack, DesiredStateRecord) == 0
    for body, status in (
        ({"model": "classifier", "version": "9.9.9", "devices": ["cam-1"]}, 404),
        ({"model": "nope", "version": "1.0.0", "devices": ["cam-1"]}, 404),
        ({"model": "classifier", "version": "1.0.0"}, 422),
        ({"model": "classifier", "version": "1.0.0", "selector": {"site": "nowhere"}}, 422),
    ):
        with pytest.raises(ApiError) as e:
            api.post("/v1/rollouts", json=body)
        assert e.value.status == status, body
    assert count(stack, Rollout) == 0 and count(stack, DesiredStateRecord) == 0


def test_rollout_builds_bundles_and_serves_them_with_range(
    api: ApiClient, stack: EmbeddedStack, model_path: Path
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    secret = enroll(api, "cam-1", site="a")["device_secret"]
    enroll(api, "pi-1", profile="raspberry-pi-4", site="a")
    rollout = api.post(
        "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "selector": {"site": "a"}}
    )
    assert rollout["state"] == "in_progress" and rollout["counts"]["waiting"] == 2
    # The engine notifies the cohort right after the answer.
    rollout = wait_until(
        lambda: (r := api.get(f"/v1/rollouts/{rollout['id']}"))["counts"]["pending"] == 2 and r,
        30, "both devices notified", 0.05,
    )  # fmt: skip
    targets = {t["device_id"]: t for t in rollout["targets"]}
    # No calibration set: int8 is passed over, fp32 TFLite (onnx2tf, checked in LiteRT) wins.
    assert (targets["pi-1"]["runtime"], targets["pi-1"]["precision"]) == ("litert", "fp32")
    assert (targets["cam-1"]["runtime"], targets["cam-1"]["precision"]) == ("onnxruntime", "fp32")
    assert count(stack, Bundle) == 2
    assert api.get("/v1/devices/cam-1")["desired_seq"] == 1
    sha = targets["cam-1"]["bundle_sha256"]
    info = api.get(f"/v1/bundles/{sha}/info")
    assert info["passed_over"] == [
        "onnxruntime/int8: int8 needs a calibration set (upload one with the model version)"
    ]
    pi_info = api.get(f"/v1/bundles/{targets['pi-1']['bundle_sha256']}/info")
    assert [p.split(":")[0] for p in pi_info["passed_over"]] == ["litert/int8"]

    url = f"{stack.url}/v1/bundles/{sha}"
    assert httpx.get(url).status_code == 401
    full = httpx.get(url, headers={"Authorization": f"Bearer {secret}"})
    assert full.status_code == 200 and len(full.content) == info["size"]
    import hashlib

    assert hashlib.sha256(full.content).hexdigest() == sha
    part = httpx.get(url, headers={"Authorization": f"Bearer {secret}", "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    tail = httpx.get(
        url,
        headers={"Authorization": f"Bearer {secret}", "Range": f"bytes={len(full.content) - 10}-"},
    )
    assert tail.status_code == 206 and tail.content == full.content[-10:]
    assert (
        httpx.get(
            f"{stack.url}/v1/bundles/{'0' * 64}", headers={"Authorization": f"Bearer {secret}"}
        ).status_code
        == 404
    )

    # A second rollout of the same version (superseding the first, which no device has
    # answered) reuses the bundles and bumps seq.
    again = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "1.0.0", "devices": ["cam-1"],
              "supersedes": rollout["id"]},
    )  # fmt: skip
    assert again["targets"][0]["bundle_sha256"] == sha and count(stack, Bundle) == 2
    wait_until(lambda: api.get("/v1/devices/cam-1")["desired_seq"] == 2, 30, "seq 2", 0.05)


def test_openapi_and_health(stack: EmbeddedStack) -> None:
    assert httpx.get(f"{stack.url}/docs").status_code == 200
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    assert {"/v1/models", "/v1/rollouts", "/v1/devices/enroll", "/v1/bundles/{sha256}"} <= set(
        spec["paths"]
    )
    # Enrollment's body and reply are the agent's msgspec structs, named in the document too,
    # with patterns a JSON Schema reader knows (msgspec's own checks end them with \Z).
    enroll_op = spec["paths"]["/v1/devices/enroll"]["post"]
    body = enroll_op["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"token", "device_id", "profile"}
    assert body["properties"]["device_id"]["pattern"].endswith("$")
    assert body["additionalProperties"] is False
    reply = enroll_op["responses"]["201"]["content"]["application/json"]["schema"]
    assert "device_secret" in reply["properties"]
    health = httpx.get(f"{stack.url}/healthz").json()
    assert health["status"] == "ok" and health["broker_connected"] is True


def test_a_batch_of_enrollment_tokens_is_made_whole_or_not_at_all(
    api: ApiClient, stack: EmbeddedStack
) -> None:
    from fleet_server.auth.tables import EnrollmentToken

    before = count(stack, EnrollmentToken)
    batch = api.post(
        "/v1/enrollment-tokens/batch",
        json={"count": 3, "profile": "raspberry-pi-5", "labels": {"pallet": "7"}},
    )
    tokens = batch["tokens"]
    assert len(set(tokens)) == 3 and batch["labels"] == {"pallet": "7"}
    assert count(stack, EnrollmentToken) == before + 3
    for i, token in enumerate(tokens):
        r = httpx.post(
            f"{stack.url}/v1/devices/enroll",
            json={"token": token, "device_id": f"pallet-{i}", "profile": "raspberry-pi-5"},
        )
        assert r.status_code == 201, r.text
    assert api.get("/v1/devices/pallet-2")["labels"] == {"pallet": "7"}
    r = httpx.post(  # each is single use
        f"{stack.url}/v1/devices/enroll",
        json={"token": tokens[0], "device_id": "pallet-9", "profile": "raspberry-pi-5"},
    )
    assert r.status_code == 401
    # Too few, too many, a profile nobody has: refused, and no token made.
    for body in ({"count": 0}, {"count": 10_001}, {"count": 2, "profile": "commodore-64"}):
        with pytest.raises(ApiError) as e:
            api.post("/v1/enrollment-tokens/batch", json=body)
        assert e.value.status == 422, body
    assert count(stack, EnrollmentToken) == before + 3
