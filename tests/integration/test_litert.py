"""The LiteRT backend on a real .tflite file in ai-edge-litert, against onnxruntime on the same
classifier, and a LiteRT bundle through the agent's whole lifecycle on a Raspberry Pi profile."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from converters.onnx.samples import mlp_classifier
from converters.tflite.samples import mlp_classifier_tflite
from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.runtimes import LoadOptions, available_runtimes, get_runtime
from tests.factories import TestFleet, make_litert_bundle


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("litert")
    return mlp_classifier_tflite(d / "m.tflite", seed=3), mlp_classifier(d / "m.onnx", seed=3)


def test_litert_matches_onnxruntime_on_the_same_classifier(pair: tuple[Path, Path]) -> None:
    tflite, onnx_path = pair
    assert "litert" in available_runtimes()
    model = get_runtime("litert").load(tflite, LoadOptions(threads=2))
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [("x", "float32", [None, 16])]
    reference = ort.InferenceSession(str(onnx_path))
    for batch in (1, 7, 3):  # the input is resized between calls
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        np.testing.assert_allclose(
            model.run({"x": x})["probs"], reference.run(None, {"x": x})[0], atol=1e-6
        )
    model.close()
    with pytest.raises(RuntimeBackendError, match="closed"):
        model.run({"x": np.zeros((1, 16), np.float32)})


def test_concurrent_calls_each_get_their_own_answer(pair: tuple[Path, Path]) -> None:
    tflite, onnx_path = pair
    model = get_runtime("litert").load(tflite, LoadOptions(threads=1))
    reference = ort.InferenceSession(str(onnx_path))
    errors: list[str] = []

    def worker(seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((1 + seed % 4, 16)).astype(np.float32)
        want = reference.run(None, {"x": x})[0]
        for _ in range(50):
            if not np.allclose(model.run({"x": x})["probs"], want, atol=1e-6):
                errors.append(f"thread {seed} got another thread's answer")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_file_that_is_not_a_model_fails_to_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(RuntimeBackendError) as e:
        get_runtime("litert").load(bad, LoadOptions())
    assert e.value.reason == "load_failed"


def test_a_litert_bundle_goes_through_the_agent_lifecycle(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Download, verify (signature, profile, runtime), stage with self-test, switch, probation,
    commit — on a raspberry-pi-4 profile whose first runtime is LiteRT."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from edge_agent.lifecycle.deployer import Deployer, DeviceContext
    from edge_agent.lifecycle.journal import Journal
    from edge_agent.lifecycle.probation import ProbationPolicy
    from edge_agent.protocol.desired import SlotAssignment
    from edge_agent.protocol.lifecycle import SlotState as State
    from edge_agent.serving import SlotTable, predict
    from edge_agent.store.models import ModelStore
    from edge_agent.trust import TrustStore
    from tests.factories import sha256

    tflite, onnx_path = pair
    fleet = TestFleet()
    www = tmp_path / "www"
    www.mkdir()
    bundle = www / "pi.efb"
    make_litert_bundle(tflite, bundle, fleet=fleet)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        table = SlotTable()
        state = tmp_path / "dev"
        deployer = Deployer(
            DeviceContext(device_id="pi-1", profile="raspberry-pi-4", runtimes=available_runtimes(),
                          load_options=LoadOptions(threads=4), credential="efd_x",
                          download_attempts=1, download_timeout_s=5),
            Journal(state / "journal.json"), ModelStore(state), table,
            TrustStore(fleet.root.public_key(), state / "keyring.json"),
            on_transition=lambda t: None, policy=ProbationPolicy(window_s=0.2, probe_interval_s=0.01),
        )  # fmt: skip
        slot = SlotAssignment(
            model="classifier", version="1.0.0", bundle_sha256=sha256(bundle),
            bundle_url=f"http://127.0.0.1:{httpd.server_address[1]}/pi.efb", size=bundle.stat().st_size,
        )  # fmt: skip
        env = fleet.desired("pi-1", 1, {"clf": slot})
        deployer.accept(env)
        deployer.converge(env.signed)
        assert deployer.journal.data.slots["clf"].state == State.COMMITTED
        served = table.snapshot()["clf"]
        assert served.ref.runtime == "litert"
        x = np.random.default_rng(9).standard_normal((3, 16)).astype(np.float32)
        want = ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0]
        np.testing.assert_allclose(
            predict(table, "clf", {"x": x}).outputs["probs"], want, atol=1e-6
        )
    finally:
        httpd.shutdown()
