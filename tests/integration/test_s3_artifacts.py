"""The S3 artifact store against a real S3-protocol server (moto's, a process of its own on a
free port): a fleet whose models and bundles live only in a bucket builds, deploys and serves;
devices download through the server with Range, or straight from the store by presigned URLs
that take Range; a missing bucket, wrong credentials or a dead endpoint stop the server's start
in one line; a store that fails mid-upload leaves no row behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from sqlmodel import Session, select

from edge_agent.config import AgentConfig
from fleet_server.artifacts import open_store
from fleet_server.artifacts.base import STALE_SCRATCH_S
from fleet_server.broker import EmbeddedBroker, free_port
from fleet_server.bundles.tables import Bundle
from fleet_server.client import ApiClient, ApiError
from fleet_server.database import make_engine
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings
from fleet_server.telemetry.catalog import BundleCatalog
from hil.rig import LocalAgent, roll_out, wait_until
from tests.conftest import ADMIN_TOKEN
from tests.objectstore import MotoServer

pytestmark = pytest.mark.slow

PREFIX = "fleet/a"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def bucket(s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, and this process's AWS variables pointing at the store (the server
    under test runs in this process and reads them through boto3, as a real one does)."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3.new_bucket()


def _settings(tmp_path: Path, broker: EmbeddedBroker, bucket: str, **extra: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "server",
        mqtt_url=broker.url,
        port=0,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        desired_resend_interval_s=0.2,
        artifacts_url=f"s3://{bucket}/{PREFIX}",
        **extra,  # type: ignore[arg-type]
    )


def _agent(api: ApiClient, stack: EmbeddedStack, root: Path, device_id: str) -> LocalAgent:
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(root, device_id, "x86-64-avx2")
    agent.enroll(stack.url, token)
    agent.start()
    agent.wait_ready()
    return agent


def _local_blobs(settings: Settings) -> list[Path]:
    return [p for p in settings.data_dir.rglob("*") if p.is_file() and len(p.name) == 64]


def test_a_fleet_on_an_s3_store_builds_deploys_and_downloads_through_the_server(
    s3: MotoServer,
    bucket: str,
    broker: EmbeddedBroker,
    model_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    settings = _settings(tmp_path, broker, bucket)
    device = f"s3-{uid}"
    with (
        EmbeddedStack(settings) as stack,
        contextlib.closing(ApiClient(stack.url, ADMIN_TOKEN)) as api,
    ):
        version = api.upload_model(model_path, "classifier", "1.0.0")
        source_key = f"{PREFIX}/sha256/{version['source_sha256'][:2]}/{version['source_sha256']}"
        assert s3.keys(bucket) == [source_key]
        agent = _agent(api, stack, tmp_path / "devices", device)
        try:
            done = roll_out(api, "classifier", "1.0.0", [device])
            assert done["state"] == "completed", done
            x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
            want = ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
            got = agent.client.predict("classifier", {"x": x})["probs"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        finally:
            agent.stop()
        sha = done["targets"][0]["bundle_sha256"]
        bundle_key = f"{PREFIX}/sha256/{sha[:2]}/{sha}"
        assert sorted(s3.keys(bucket)) == sorted([source_key, bundle_key])
        # Nothing of it on the server's disk: the build's copy and the spool are gone.
        assert _local_blobs(settings) == []
        # The device's download went through the server (boto's signed GETs, no presigned one).
        assert s3.gets(bundle_key) and not [g for g in s3.gets(bundle_key) if "X-Amz-" in g]

        stored = s3.client().get_object(Bucket=bucket, Key=bundle_key)["Body"].read()
        size = len(stored)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        url = f"{stack.url}/v1/bundles/{sha}"
        whole = httpx.get(url, headers=headers)
        assert whole.status_code == 200 and whole.content == stored
        assert whole.headers["content-length"] == str(size)
        for asked, part in (
            ("bytes=1000-", stored[1000:]),
            ("bytes=10-19", stored[10:20]),
            ("bytes=-7", stored[-7:]),
        ):
            r = httpx.get(url, headers={**headers, "Range": asked})
            assert r.status_code == 206 and r.content == part, (asked, r.status_code)
            assert r.headers["content-range"].endswith(f"/{size}")
        r = httpx.get(url, headers={**headers, "Range": f"bytes={size}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
        onnx = httpx.get(f"{stack.url}/v1/models/classifier/versions/1.0.0/onnx", headers=headers)
        assert onnx.status_code == 200 and onnx.content == model_path.read_bytes()

        # Telemetry reads the drift baseline out of the bundle in the bucket.
        catalog = BundleCatalog(open_store(settings))
        engine = make_engine(settings.resolved_database_url)
        with Session(engine) as session:
            info = catalog.get(session, sha)
        engine.dispose()
        assert info is not None and info.baseline is not None and info.model == "classifier"


def test_presigned_downloads_come_from_the_store_and_resume_with_range(
    s3: MotoServer,
    bucket: str,
    broker: EmbeddedBroker,
    model_path: Path,
    tmp_path: Path,
    uid: str,
) -> None:
    settings = _settings(
        tmp_path, broker, bucket, bundle_downloads="presigned", presigned_url_ttl_s=120
    )
    device = f"s3p-{uid}"
    with (
        EmbeddedStack(settings) as stack,
        contextlib.closing(ApiClient(stack.url, ADMIN_TOKEN)) as api,
    ):
        api.upload_model(model_path, "classifier", "1.0.0")
        agent = _agent(api, stack, tmp_path / "devices", device)
        try:
            done = roll_out(api, "classifier", "1.0.0", [device])
            assert done["state"] == "completed", done
            assert agent.serving("classifier")["version"] == "1.0.0"  # type: ignore[index]
        finally:
            agent.stop()
        sha = done["targets"][0]["bundle_sha256"]
        bundle_key = f"{PREFIX}/sha256/{sha[:2]}/{sha}"
        # The agent fetched it from the store, by a presigned URL (the server reads the bundle
        # too, with its own signed GETs, for the drift baseline telemetry needs).
        presigned = [g for g in s3.gets(bundle_key) if "X-Amz-Signature=" in g]
        assert presigned and presigned[0].endswith("-> 200"), s3.gets(bundle_key)

        credential = AgentConfig.load(agent.config).read_credential()
        url = f"{stack.url}/v1/bundles/{sha}"
        sent = httpx.get(url, headers={"Authorization": f"Bearer {credential}"})
        assert sent.status_code == 307 and sent.headers["cache-control"] == "no-store"
        location = sent.headers["location"]
        query = parse_qs(urlsplit(location).query)
        # Signed for the host alone, never for a Range: the device sends one to resume.
        assert query["X-Amz-SignedHeaders"] == ["host"] and query["X-Amz-Expires"] == ["120"]
        stored = s3.client().get_object(Bucket=bucket, Key=bundle_key)["Body"].read()
        r = httpx.get(location, headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == stored[100:]
        # An operator's download still goes through the server.
        admin = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 200 and admin.content == stored
        # A device not assigned the bundle gets no URL.
        other = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
        enrolled = httpx.post(
            f"{stack.url}/v1/devices/enroll",
            json={"token": other, "device_id": f"s3q-{uid}", "profile": "x86-64-avx2"},
        )
        assert enrolled.status_code in (200, 201), enrolled.text
        secret = enrolled.json()["device_secret"]
        refused = httpx.get(url, headers={"Authorization": f"Bearer {secret}"})
        assert refused.status_code == 403 and "location" not in refused.headers


def test_a_store_that_fails_leaves_no_row_behind(
    broker: EmbeddedBroker, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store stops answering: an upload is refused (503) with no version recorded and no
    spool left; a build fails naming the store, with no bundle recorded."""
    with MotoServer(tmp_path) as own:
        for name, value in own.env().items():
            monkeypatch.setenv(name, value)
        settings = _settings(tmp_path, broker, own.new_bucket())
        with (
            EmbeddedStack(settings) as stack,
            contextlib.closing(ApiClient(stack.url, ADMIN_TOKEN)) as api,
        ):
            api.upload_model(model_path, "classifier", "1.0.0")  # while the store is up
            own.stop()
            with pytest.raises(ApiError) as refused:
                api.upload_model(model_path, "classifier", "2.0.0")
            assert refused.value.status == 503, refused.value
            message = str(refused.value)
            assert "does not answer" in message and "AWS_ENDPOINT_URL" in message, message
            versions = api.get("/v1/models/classifier")["versions"]
            assert [v["version"] for v in versions] == ["1.0.0"]
            spool = settings.data_dir / "artifacts-spool"
            assert [p for p in spool.rglob("*") if p.is_file()] == []

            build = api.post(
                "/v1/builds",
                json={"model": "classifier", "version": "1.0.0", "profile": "x86-64-avx2"},
            )
            done = wait_until(
                lambda: (b := api.get(f"/v1/builds/{build['id']}"))["state"] == "failed" and b,
                120,
                "the build to fail",
            )
            assert done["error"]["reason"] == "artifact_store", done["error"]
            assert "does not answer" in done["error"]["message"], done["error"]
            assert done.get("bundle_sha256") is None
            engine = make_engine(settings.resolved_database_url)
            with Session(engine) as session:
                assert session.exec(select(Bundle)).all() == []
            engine.dispose()


def _serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``edgefleet serve`` as an operator runs it; it must refuse before it serves."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet"), "serve"],
        env={
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(tmp_path / "refused"),
            "EDGEFLEET_PORT": str(free_port()),
            "EDGEFLEET_MQTT_URL": "mqtt://127.0.0.1:1",  # never reached: it stops before
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_bucket_bad_credentials_or_dead_endpoint_stop_the_start_in_one_line(
    s3: MotoServer, tmp_path: Path
) -> None:
    cases = [
        ({**s3.env(), "EDGEFLEET_ARTIFACTS_URL": "s3://no-such-bucket/x"}, "does not exist"),
        (
            {
                **s3.env(),
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                "EDGEFLEET_ARTIFACTS_URL": "s3://edgefleet-any/x",
            },
            "does not answer",
        ),
        ({"EDGEFLEET_BUNDLE_DOWNLOADS": "presigned"}, "needs an S3 artifact store"),
    ]
    with MotoServer(tmp_path, auth=True) as strict:
        bucket = strict.new_bucket()
        cases.append(
            (
                {
                    **strict.env(secret_key="wrong-secret"),
                    "EDGEFLEET_ARTIFACTS_URL": f"s3://{bucket}/x",
                },
                "access denied",
            )
        )
        for env, said in cases:
            done = _serve(env, tmp_path)
            assert done.returncode != 0, (env, done.stderr)
            # One line, and nothing before it: it stopped before the database was touched.
            assert done.stderr.count("\n") == 1 and said in done.stderr, (said, done.stderr)
            assert not (tmp_path / "refused" / "edgefleet.db").exists()
        # The right key is let in (the strict store does check them).
        done = _serve(
            {**strict.env(), "EDGEFLEET_ARTIFACTS_URL": "s3://no-such-bucket-2/x"}, tmp_path
        )
        assert "does not exist" in done.stderr, done.stderr[-2000:]


def test_start_up_removes_spool_a_dead_server_left(
    broker: EmbeddedBroker, bucket: str, tmp_path: Path
) -> None:
    """A server killed mid-upload leaves its spool file; the next start removes it once
    nothing in it has changed for a day, and leaves a spool still being written."""
    settings = _settings(tmp_path, broker, bucket)
    spool = settings.data_dir / "artifacts-spool"
    left, busy = spool / "tmpkilled", spool / "tmpbusy"
    for scratch, age in ((left, STALE_SCRATCH_S + 60), (busy, 60)):
        scratch.mkdir(parents=True)
        (scratch / "upload").write_bytes(b"\0" * 4096)
        then = time.time() - age
        for path in (scratch / "upload", scratch):
            os.utime(path, (then, then))
    open_store(settings).check()
    assert not left.exists() and busy.exists()
