"""Models whose inputs are not all ``[batch, …]``, end to end: a streaming GRU exported from
torch, with a recurrent state ``[layers, batch, hidden]`` and a scalar sample rate, uploaded
with a calibration set of complete feeds, built for an x86 and a Raspberry Pi profile, served
by real agent processes — and each device's answer to a held-out feed equals onnxruntime's on
the original model within the figures of the build's own parity report. Where a converter
cannot take the model, the build says which node, which operator, and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from hil.rig import LocalAgent, roll_out

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

LAYERS, HIDDEN, FEATURES, CLASSES = 2, 32, 16, 4


def streaming_gru(path: Path) -> Path:
    """x [batch, 16], h0 [2, batch, 32], sample_rate [] (int64) → probs [batch, 4], hn."""
    import torch
    from torch import nn

    class StreamingGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gru = nn.GRU(FEATURES, HIDDEN, num_layers=LAYERS)
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(
            self, x: torch.Tensor, h0: torch.Tensor, sample_rate: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            scale = sample_rate.to(torch.float32) / 16000.0
            out, hn = self.gru((x * scale).unsqueeze(0), h0)
            return torch.softmax(self.head(out[0]), dim=-1), hn

    example = (
        torch.zeros(1, FEATURES),
        torch.zeros(LAYERS, 1, HIDDEN),
        torch.tensor(16000, dtype=torch.int64),
    )
    torch.onnx.export(
        StreamingGRU().eval(),
        example,
        str(path),
        input_names=["x", "h0", "sample_rate"],
        output_names=["probs", "hn"],
        dynamic_axes={
            "x": {0: "batch"},
            "h0": {1: "batch"},
            "probs": {0: "batch"},
            "hn": {1: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )
    return path


def feeds(samples: int, seed: int) -> dict[str, np.ndarray]:
    """Complete feeds stacked on a new leading axis (the calibration layout)."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((samples, 1, FEATURES)).astype(np.float32),
        "h0": (0.3 * rng.standard_normal((samples, LAYERS, 1, HIDDEN))).astype(np.float32),
        "sample_rate": np.full(samples, 16000, np.int64),
    }


def _x86_and_pi(api: ApiClient, stack: EmbeddedStack, root: Path, name: str) -> list[LocalAgent]:
    """Two real agent processes, enrolled and serving: an x86 and a Raspberry Pi 4 profile."""
    agents = []
    for profile in ("x86-64-avx2", "raspberry-pi-4"):
        token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
        agent = LocalAgent(root / "devices", f"{name}-{profile[:6]}", profile)
        agent.enroll(stack.url, token)
        agent.start()
        agents.append(agent)
    try:
        for agent in agents:
            agent.wait_ready()
    except BaseException:
        for agent in agents:
            agent.stop()
        raise
    return agents


def test_a_stateful_streaming_model_deploys_to_x86_and_arm(
    stack: EmbeddedStack, api: ApiClient, tmp_path: Path, uid: str
) -> None:
    model = streaming_gru(tmp_path / "gru.onnx")
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, **feeds(48, seed=1))
    validation = tmp_path / "validation.npz"
    np.savez(validation, **feeds(8, seed=2))

    # The old rule (axis 0 = samples, the rest = the input without its batch axis) cannot say
    # a scalar or a state input; a set shaped that way is refused at upload, naming the fix.
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{**feeds(8, seed=3), "h0": np.zeros((8, 1, HIDDEN), np.float32)})
    with pytest.raises(Exception) as refused:
        api.upload_model(model, "keyword-spotter", "0.9.0", calibration=wrong)
    assert "expected [samples, 2, batch, 32]" in str(refused.value)

    version = api.upload_model(
        model, "keyword-spotter", "1.0.0", calibration=calibration, validation=validation
    )
    assert [i["shape"] for i in version["inputs"]] == [["batch", 16], [2, "batch", 32], []]

    agents = _x86_and_pi(api, stack, tmp_path, f"kws-{uid}")
    try:
        done = roll_out(
            api, "keyword-spotter", "1.0.0", [a.device_id for a in agents], timeout_s=300
        )
        assert done["state"] == "completed", done
        held_out = {k: np.asarray(v[0]) for k, v in feeds(8, seed=2).items()}
        want = ort.InferenceSession(str(model)).run(None, held_out)
        targets = {t["device_id"]: t for t in done["targets"]}
        for agent in agents:
            target = targets[agent.device_id]
            bundle = api.get(f"/v1/bundles/{target['bundle_sha256']}/info")
            chosen = bundle["manifest"]["parity"]["chosen"]
            got = agent.client.predict("keyword-spotter", held_out)
            for name, ref in zip(("probs", "hn"), want, strict=True):
                err = float(np.max(np.abs(got[name] - ref)))
                # The same feed the parity gate measured: within its figure.
                assert err <= chosen["max_abs_error"] + 1e-5, (agent.profile, name, err, chosen)
            if agent.profile == "x86-64-avx2":
                assert (chosen["runtime"], chosen["precision"]) == ("onnxruntime", "int8")
            else:
                # onnx2tf cannot lower this GRU: the Pi serves it with onnxruntime, and the
                # build says why LiteRT was passed over, naming the node and its operator.
                assert chosen["runtime"] == "onnxruntime"
                passed_over = " ".join(bundle["passed_over"])
                assert "litert/" in passed_over and "at ONNX node" in passed_over
                assert "what to do" in passed_over
        build_logs = [api.get(f"/v1/builds/{b['id']}/log")["text"] for b in api.get("/v1/builds")]
        assert any("kept in fp32 by quantization" in log and "'h0'" in log for log in build_logs)
    finally:
        for agent in agents:
            agent.stop()


def test_an_embedding_is_gated_by_cosine_similarity(api: ApiClient, tmp_path: Path) -> None:
    from converters.onnx.samples import mlp_embedder
    from fleet_server.client import ApiError

    model = mlp_embedder(tmp_path / "embedder.onnx")
    calibration = tmp_path / "cal.npz"
    rng = np.random.default_rng(4)
    np.savez(calibration, x=rng.standard_normal((48, 1, 16)).astype(np.float32))
    for kinds, needle in (
        ({"vectors": "embedding"}, "not outputs of this model"),
        ({"embedding": "vibes"}, "a kind is one of"),
    ):
        with pytest.raises(ApiError) as e:
            api.upload_model(
                model, "embedder", "0.1.0", calibration=calibration, output_kinds=kinds
            )
        assert e.value.status == 422 and needle in e.value.message
    version = api.upload_model(
        model, "embedder", "1.0.0", calibration=calibration, output_kinds={"embedding": "embedding"}
    )
    assert version["outputs"][0]["kind"] == "embedding"

    def build(**thresholds: float) -> dict:  # type: ignore[type-arg]
        started = api.post(
            "/v1/builds",
            json={"model": "embedder", "version": "1.0.0", "profile": "x86-64-avx2",
                  "precisions": ["int8"], "thresholds": thresholds},
        )  # fmt: skip
        from hil.rig import wait_until

        return wait_until(
            lambda: (
                (b := api.get(f"/v1/builds/{started['id']}"))["state"] in ("succeeded", "failed")
                and b
            ),
            120,
            "the build",
        )

    ok = build()
    assert ok["state"] == "succeeded", ok["error"]
    parity = ok["candidates"][0]["parity"]["outputs"]["embedding"]
    assert parity["kind"] == "embedding" and parity["min_cosine_similarity"] > 0.99
    strict = build(min_cosine_similarity=0.9999999)
    assert strict["state"] == "failed" and "min_cosine_similarity" in strict["error"]["message"]


def test_a_public_model_a_pip_package_ships(
    stack: EmbeddedStack, api: ApiClient, tmp_path: Path, uid: str
) -> None:
    """PP-OCR's text-direction classifier, as rapidocr-onnxruntime ships it (installed by the
    dev setup, without dependencies): a Paddle export nobody here wrote, with -1 and '?'
    dimensions. Built for x86 and a Pi (LiteRT through onnx2tf), served, and answering as
    onnxruntime does on the original within the parity figures."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec is not None and spec.origin, "the dev setup installs rapidocr-onnxruntime"
    model = Path(spec.origin).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (40, 1, 3, 48, 192)).astype(np.float32)  # its 48x192 crops
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=images[:32])
    validation = tmp_path / "val.npz"
    np.savez(validation, x=images[32:])
    api.upload_model(
        model, "text-direction", "1.0.0", calibration=calibration, validation=validation
    )

    agents = _x86_and_pi(api, stack, tmp_path, f"ocr-{uid}")
    try:
        done = roll_out(
            api, "text-direction", "1.0.0", [a.device_id for a in agents], timeout_s=600
        )
        assert done["state"] == "completed", done
        feed = {"x": images[35]}
        [want] = ort.InferenceSession(str(model)).run(None, feed)
        targets = {t["device_id"]: t for t in done["targets"]}
        for agent in agents:
            bundle = api.get(f"/v1/bundles/{targets[agent.device_id]['bundle_sha256']}/info")
            chosen = bundle["manifest"]["parity"]["chosen"]
            [got] = agent.client.predict("text-direction", feed).values()
            assert float(np.max(np.abs(got - want))) <= chosen["max_abs_error"] + 1e-5, chosen
            assert int(np.argmax(got)) == int(np.argmax(want))
            if agent.profile == "raspberry-pi-4":
                # onnx2tf 1.29 cannot lower this Paddle graph for LiteRT; the Pi serves it with
                # onnxruntime, and the build names the node, its operator and what to do.
                passed_over = " ".join(bundle["passed_over"])
                assert chosen["runtime"] == "onnxruntime" and "litert/fp32" in passed_over
                assert "at ONNX node" in passed_over and "what to do" in passed_over
    finally:
        for agent in agents:
            agent.stop()


def test_control_flow_builds_for_x86_and_says_why_litert_cannot(
    api: ApiClient, tmp_path: Path
) -> None:
    """An ONNX ``If``: onnxruntime runs it on x86; on a Pi, LiteRT cannot (onnx2tf leaves it
    as a custom op or fails on it), the build says so naming the operator, and the profile's
    onnxruntime serves it."""
    from converters.onnx.samples import conditional_classifier
    from hil.rig import wait_until

    model = conditional_classifier(tmp_path / "conditional.onnx")
    calibration = tmp_path / "cal.npz"
    np.savez(
        calibration, x=np.random.default_rng(6).standard_normal((40, 1, 16)).astype(np.float32)
    )
    api.upload_model(model, "conditional", "1.0.0", calibration=calibration)
    builds = {}
    for profile in ("x86-64-avx2", "raspberry-pi-4"):
        started = api.post(
            "/v1/builds", json={"model": "conditional", "version": "1.0.0", "profile": profile}
        )
        builds[profile] = wait_until(
            lambda b=started: (
                (x := api.get(f"/v1/builds/{b['id']}"))["state"] in ("succeeded", "failed") and x
            ),
            300,
            f"the {profile} build",
        )
    x86, pi = builds["x86-64-avx2"], builds["raspberry-pi-4"]
    assert x86["state"] == "succeeded" and x86["runtime"] == "onnxruntime", x86["error"]
    assert pi["state"] == "succeeded" and pi["runtime"] == "onnxruntime", pi["error"]
    litert = [c for c in pi["candidates"] if c["runtime"] == "litert"]
    assert litert and all(c["outcome"] == "error" for c in litert)
    assert all("If" in c["error"] for c in litert), [c["error"] for c in litert]
