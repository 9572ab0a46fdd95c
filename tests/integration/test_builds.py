"""Build jobs through the REST API and the CLI on a real server: calibration upload checks,
async jobs with a streamed log and parity report, the cache, a crashing converter, and the
TFLite path through the pinned onnx2tf toolchain checked in LiteRT."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from converters.toolchains import locate
from edge_agent.runtimes import LoadOptions, get_runtime
from fleet_server.builds.tables import Build
from fleet_server.cli.main import app as cli
from fleet_server.client import ApiClient, ApiError
from fleet_server.registry.tables import ModelVersion
from fleet_server.server import EmbeddedStack
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_api import artifacts, count


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    x = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32)
    return _npz(tmp_path / "cal.npz", x=x)


def wait_build(api: ApiClient, build_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        build: dict[str, Any] = api.get(f"/v1/builds/{build_id}")
        if build["state"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return build
        time.sleep(0.2)


def test_bad_calibration_upload_is_refused_and_stores_nothing(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, tmp_path: Path
) -> None:
    before = artifacts(stack)
    wrong = _npz(tmp_path / "bad.npz", x=np.zeros((8, 16), np.float64))
    with pytest.raises(ApiError) as e:
        api.upload_model(model_path, "classifier", "1.0.0", calibration=wrong)
    assert e.value.status == 422
    assert "calibration set: input 'x' has dtype float64, the model takes float32" in str(e.value)
    empty = _npz(tmp_path / "empty.npz", x=np.zeros((0, 16), np.float32))
    with pytest.raises(ApiError, match="holds no samples"):
        api.upload_model(model_path, "classifier", "1.0.0", validation=empty)
    assert count(stack, ModelVersion) == 0 and artifacts(stack) == before


def test_build_job_reports_parity_streams_its_log_and_is_cached(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, calibration: Path
) -> None:
    v = api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)
    assert v["calibration_samples"] == 64 and v["calibration_sha256"]
    body = {"model": "classifier", "version": "1.0.0", "profile": "x86-64-avx2"}
    build = api.post("/v1/builds", json=body)
    assert build["state"] in ("queued", "running", "succeeded")
    done = wait_build(api, build["id"])
    assert done["state"] == "succeeded", done["error"]
    assert (done["runtime"], done["precision"]) == ("onnxruntime", "int8")
    (candidate,) = done["candidates"]
    assert candidate["parity"]["passed"] and candidate["parity"]["top1_agreement"] >= 0.99
    assert done["peak_rss_mb"] > 0 and done["seconds"] is not None
    log = api.get(f"/v1/builds/{build['id']}/log")
    assert "onnxruntime/int8: passed the parity gate" in log["text"]
    tail = api.get(f"/v1/builds/{build['id']}/log", params={"offset": log["next_offset"]})
    assert tail["text"] == ""
    info = api.get(f"/v1/bundles/{done['bundle_sha256']}/info")
    assert info["precision"] == "int8"
    # Same inputs: the same build, not a new compile.
    assert api.post("/v1/builds", json=body)["id"] == build["id"]
    # A threshold override is another build; impossible thresholds fail it with the numbers.
    strict = api.post(
        "/v1/builds",
        json={**body, "precisions": ["int8"], "thresholds": {"max_rel_l2": 1e-9}},
    )
    failed = wait_build(api, strict["id"])
    assert failed["state"] == "failed" and failed["error"]["reason"] == "no_artifact"
    assert "onnxruntime/int8: max_rel_l2" in failed["error"]["message"]
    assert failed["candidates"][0]["parity"]["failed"][0].startswith("max_rel_l2 ")
    with pytest.raises(ApiError, match="unknown parity threshold"):
        api.post("/v1/builds", json={**body, "thresholds": {"top5": 0.5}})
    with pytest.raises(ApiError) as e:
        api.post("/v1/builds", json={**body, "profile": "toaster"})
    assert e.value.status == 422


def test_a_crashing_converter_fails_the_job_not_the_server(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0")
    monkeypatch.setenv("EDGEFLEET_BUILD_FAILPOINT", "crash")
    body = {"model": "classifier", "version": "1.0.0", "profile": "x86-64-avx2"}
    failed = wait_build(api, api.post("/v1/builds", json=body)["id"])
    assert failed["state"] == "failed" and failed["error"]["reason"] == "converter_crashed"
    assert "simulated converter crash" in failed["error"]["message"]
    assert failed["error"]["detail"]["exit_code"] == -11
    monkeypatch.delenv("EDGEFLEET_BUILD_FAILPOINT")
    assert api.get("/healthz")["status"] == "ok"
    # A failed build is not a cache hit: asking again compiles.
    retry = wait_build(api, api.post("/v1/builds", json=body)["id"])
    assert retry["state"] == "succeeded" and retry["id"] != failed["id"]
    assert count(stack, Build) == 2


def test_cli_builds_create_follows_the_log_and_exits_1_on_failure(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, calibration: Path
) -> None:
    api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)
    runner = CliRunner()
    common = ["--server", stack.url, "--token", ADMIN_TOKEN]
    ok = runner.invoke(
        cli, ["builds", "create", "classifier", "1.0.0", "--profile", "x86-64-avx2", *common]
    )
    assert ok.exit_code == 0, ok.output
    assert "passed the parity gate" in ok.output and "onnxruntime/int8" in ok.output
    bad = runner.invoke(
        cli,
        ["builds", "create", "classifier", "1.0.0", "--profile", "x86-64-avx2",
         "--precision", "int8", "--threshold", "max_rel_l2=1e-9", *common],
    )  # fmt: skip
    assert bad.exit_code == 1 and "max_rel_l2" in bad.output
    listed = runner.invoke(cli, ["builds", "list", "--json", *common])
    assert listed.exit_code == 0
    assert sorted(b["state"] for b in json.loads(listed.output)) == ["failed", "succeeded"]


@pytest.mark.slow
def test_tflite_int8_through_onnx2tf_runs_in_litert_with_the_onnx_names(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, calibration: Path, tmp_path: Path
) -> None:
    toolchain = locate("tflite")  # scripts/test.sh installs it; missing is a failure, not a skip
    api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)
    body = {"model": "classifier", "version": "1.0.0", "profile": "raspberry-pi-4"}
    done = wait_build(api, api.post("/v1/builds", json=body)["id"])
    assert done["state"] == "succeeded", done["error"]
    assert (done["runtime"], done["precision"]) == ("litert", "int8")
    parity = done["candidates"][0]["parity"]
    assert parity["evaluated_in"] == "LiteRT (ai-edge-litert)" and parity["top1_agreement"] >= 0.98
    info = api.get(f"/v1/bundles/{done['bundle_sha256']}/info")
    assert (
        info["manifest"]["toolchain"]["tflite-toolchain/onnx2tf"] == toolchain.versions["onnx2tf"]
    )
    # The artifact answers to the ONNX input/output names in the agent's runtime.
    import tarfile

    blob = (
        stack.settings.artifacts_dir / "sha256" / done["bundle_sha256"][:2] / done["bundle_sha256"]
    )
    with tarfile.open(blob) as tar:
        (tmp_path / "m.tflite").write_bytes(tar.extractfile("model/model.tflite").read())  # type: ignore[union-attr]
    loaded = get_runtime("litert").load(tmp_path / "m.tflite", LoadOptions(threads=1))
    assert [s.name for s in loaded.inputs] == ["x"] and [s.name for s in loaded.outputs] == [
        "probs"
    ]
    assert loaded.run({"x": np.zeros((1, 16), np.float32)})["probs"].shape == (1, 4)


def test_missing_toolchain_passes_litert_over_with_the_fix(
    api: ApiClient, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_TOOLCHAIN_DIR", str(tmp_path / "none"))
    api.upload_model(model_path, "classifier", "1.0.0")
    body = {"model": "classifier", "version": "1.0.0", "profile": "raspberry-pi-4"}
    done = wait_build(api, api.post("/v1/builds", json=body)["id"])
    assert done["state"] == "succeeded" and done["runtime"] == "onnxruntime"
    litert = [c for c in done["candidates"] if c["runtime"] == "litert"]
    assert any("run: edgefleet toolchain install tflite" in c["error"] for c in litert)
    only = api.post("/v1/builds", json={**body, "runtimes": ["litert"]})
    failed = wait_build(api, only["id"])
    assert (
        failed["state"] == "failed"
        and "edgefleet toolchain install tflite" in failed["error"]["message"]
    )
    assert os.environ["EDGEFLEET_TOOLCHAIN_DIR"].endswith("none")


def test_rollout_builds_each_cohort_side_by_side_and_the_cli_follows_them(
    api: ApiClient, stack: EmbeddedStack, model_path: Path, calibration: Path
) -> None:
    """A rollout over two cohorts queues both builds at once; with build_wait_s=0 the server
    answers 409 build_pending naming them and writes no rollout; the CLI follows the builds
    and then creates the rollout."""
    from fleet_server.rollouts.tables import Rollout

    for device_id, profile in [("x86-1", "x86-64-avx2"), ("orin-1", "jetson-orin-nano")]:
        token = api.post("/v1/enrollment-tokens", json={})["token"]
        api.post(
            "/v1/devices/enroll",
            json={"token": token, "device_id": device_id, "profile": profile,
                  "runtimes": {"onnxruntime": "1.20.0"}},
        )  # fmt: skip
    api.upload_model(model_path, "classifier", "1.0.0", calibration=calibration)
    body = {"model": "classifier", "version": "1.0.0", "devices": ["x86-1", "orin-1"]}
    with pytest.raises(ApiError) as e:
        api.post("/v1/rollouts", json=body, params={"build_wait_s": 0})
    assert e.value.status == 409 and e.value.reason == "build_pending"
    build_ids = e.value.fields["detail"]["build_ids"]
    builds = [api.get(f"/v1/builds/{b}") for b in build_ids]
    assert sorted(b["profile"] for b in builds) == ["jetson-orin-nano", "x86-64-avx2"]
    assert count(stack, Rollout) == 0
    for b in build_ids:
        assert wait_build(api, b)["state"] == "succeeded"
    # Built now: the same request succeeds without waiting.
    first = api.post("/v1/rollouts", json=body, params={"build_wait_s": 0})
    assert {t["profile"] for t in first["targets"]} == {"x86-64-avx2", "jetson-orin-nano"}

    api.upload_model(model_path, "classifier", "1.0.1", calibration=calibration)
    result = CliRunner().invoke(
        cli,
        ["rollouts", "create", "--model", "classifier", "--version", "1.0.1",
         "--device", "x86-1", "--device", "orin-1", "--no-wait",
         "--supersedes", first["id"], "--server", stack.url, "--token", ADMIN_TOKEN],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "building the bundle for this rollout" in result.output
    assert count(stack, Rollout) == 2
    # The same ONNX bytes as another version get their own bundles (their manifests differ).
    second = next(r for r in api.get("/v1/rollouts") if r["id"] != first["id"])
    first_shas = {t["bundle_sha256"] for t in first["targets"]}
    assert not first_shas & {t["bundle_sha256"] for t in second["targets"]}


def test_a_build_made_ahead_is_reused_by_the_rollout(
    api: ApiClient, model_path: Path, uid: str
) -> None:
    """`builds create` asks for every runtime of the profile; a rollout asks for the ones its
    device has. Where those leave the same candidates, it is the same artifact: one build."""
    api.upload_model(model_path, "classifier", "1.0.0")
    build = api.post(
        "/v1/builds", json={"model": "classifier", "version": "1.0.0", "profile": "x86-64-avx2"}
    )
    deadline = time.monotonic() + 120
    while api.get(f"/v1/builds/{build['id']}")["state"] != "succeeded":
        assert time.monotonic() < deadline, api.get(f"/v1/builds/{build['id']}")
        time.sleep(0.2)
    token = api.post("/v1/enrollment-tokens", json={})["token"]
    device = f"ahead-{uid}"
    api.post(
        "/v1/devices/enroll",
        json={
            "token": token,
            "device_id": device,
            "profile": "x86-64-avx2",
            "runtimes": {"onnxruntime": "1.20.0"},  # all the runtimes x86-64-avx2 lists
        },
    )
    rollout = api.post(
        "/v1/rollouts?build_wait_s=0",
        json={"model": "classifier", "version": "1.0.0", "devices": [device]},
    )
    assert (
        rollout["targets"][0]["bundle_sha256"]
        == api.get(f"/v1/builds/{build['id']}")["bundle_sha256"]
    )
    assert len(api.get("/v1/builds")) == 1
