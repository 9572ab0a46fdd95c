"""Image files scored as the model expects them: the preprocessing written into the ONNX file
(``edgefleet models annotate``), checked at upload, carried by the build into the signed
manifest, and applied by ``edge-agent score`` on a real agent process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from converters.onnx.annotate import annotate
from converters.onnx.inspect import inspect_onnx
from converters.onnx.samples import resnet_like
from edge_agent.bundle import PREPROCESS_METADATA_KEY, ImagePreprocess
from edge_agent.contracts.errors import ConversionError
from fleet_server.client import ApiClient, ApiError
from fleet_server.demo.agents import LocalAgent
from fleet_server.server import EmbeddedStack
from hil.rig import roll_out

SIZE = 32
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def image_model(path: Path) -> Path:
    return resnet_like(path, widths=(8, 16), blocks=1, classes=5, image=SIZE, seed=2)


def spec(**changes: object) -> ImagePreprocess:
    base: dict[str, object] = {"input": "x", "size": (SIZE, SIZE), "mean": MEAN, "std": STD}
    return ImagePreprocess.from_dict({**base, **changes})


def expected_input(pixels: np.ndarray) -> np.ndarray:
    """What the model must see for an RGB image of exactly SIZE x SIZE: no resize."""
    x = pixels.astype(np.float32) / 255
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return x.transpose(2, 0, 1)[np.newaxis].astype(np.float32)


def test_annotate_checks_the_model_first_and_a_bad_annotation_is_refused_at_upload(
    api: ApiClient, stack: EmbeddedStack, tmp_path: Path
) -> None:
    model = image_model(tmp_path / "m.onnx")
    before = model.read_bytes()
    for bad, words in (
        (spec(size=(64, 64)), "the preprocessed image is [1, 3, 64, 64]"),
        (spec(input="nope"), "names input 'nope'"),
        (spec(layout="NHWC"), "NHWC"),
    ):
        with pytest.raises(ConversionError) as caught:
            annotate(model, model, bad)
        assert words in caught.value.message and caught.value.reason == "bad_preprocess"
        assert model.read_bytes() == before  # a refusal writes nothing

    annotate(model, tmp_path / "ok.onnx", spec())
    assert inspect_onnx(tmp_path / "ok.onnx").preprocess == spec()

    # Metadata written by hand, wrong: the upload says what is wrong and stores nothing.
    proto = onnx.load(str(model))
    entry = proto.metadata_props.add()
    entry.key, entry.value = PREPROCESS_METADATA_KEY, json.dumps({"input": "x", "size": [0, 9]})
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ApiError) as refused:
        api.upload_model(tmp_path / "bad.onnx", "imgbad", "1.0.0")
    assert refused.value.status == 422 and "edgefleet.preprocess" in str(refused.value)
    assert all(m["name"] != "imgbad" for m in api.get("/v1/models"))


def test_models_annotate_cli_writes_or_refuses_in_one_line(tmp_path: Path) -> None:
    model = image_model(tmp_path / "m.onnx")
    before = model.read_bytes()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from fleet_server.cli import main; main()", "models",
             "annotate", str(model), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    wrong = cli("--image-input", "x", "--size", "48x48")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "[1, 3, 48, 48]" in wrong.stderr and model.read_bytes() == before
    usage = cli("--image-input", "x", "--size", "32x32", "--layout", "CHWN")
    assert usage.returncode == 2 and "layout" in usage.stderr and model.read_bytes() == before
    ok = cli("--image-input", "x", "--size", "32x32", "--mean", "0.485,0.456,0.406",
             "--std", "0.229,0.224,0.225")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    words = " ".join(ok.stdout.split())  # rich wraps its lines at 80 columns
    assert "images feed x as [1, 3, 32, 32]" in words
    assert inspect_onnx(model).preprocess == spec()


@pytest.mark.slow
def test_an_agent_scores_image_files_as_its_bundle_says(
    api: ApiClient, stack: EmbeddedStack, tmp_path: Path, uid: str
) -> None:
    model = image_model(tmp_path / "m.onnx")
    annotate(model, model, spec())
    api.upload_model(model, "imgclf", "1.0.0")
    token = api.post("/v1/enrollment-tokens", json={"profile": "x86-64-avx2"})["token"]
    agent = LocalAgent(tmp_path / "devices", f"img-{uid}", "x86-64-avx2")
    agent.enroll(stack.url, token)
    agent.start()
    try:
        agent.wait_ready()
        done = roll_out(api, "imgclf", "1.0.0", [agent.device_id], timeout_s=180)
        assert done["state"] == "completed", done
        described = agent.client.describe("imgclf")
        assert described["preprocess"]["mean"] == MEAN  # from the signed manifest

        rng = np.random.default_rng(4)
        images = tmp_path / "images"
        images.mkdir()
        pictures = {}
        for i in range(6):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            path = images / f"cam-{i}.png"
            Image.fromarray(pixels).save(path)
            pictures[path] = expected_input(pixels)
        # A larger photo of one colour (resized: still that colour), and a grey one.
        Image.new("RGB", (200, 120), (10, 200, 30)).save(images / "big.jpg", quality=100)
        pictures[images / "big.jpg"] = expected_input(np.full((SIZE, SIZE, 3), (10, 200, 30)))
        Image.new("L", (SIZE, SIZE), 77).save(images / "grey.png")
        pictures[images / "grey.png"] = expected_input(np.full((SIZE, SIZE, 3), 77))
        (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        out = tmp_path / "scores.npz"
        scored = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "score", "--config", str(agent.config),
             "--model", "imgclf", "--in", str(images), "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert scored.returncode == 1 and "broken.jpg: bad_image" in scored.stderr, scored.stderr
        assert "scored 8 file(s), 8 row(s)" in scored.stdout
    finally:
        agent.stop()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(out) as npz:
        files, logits = npz["file"].tolist(), npz["output/logits"]
    for path, x in pictures.items():
        want = session.run(None, {"x": x})[0][0]
        # JPEG's colour conversion moves a flat colour by a level or two: a looser bound there.
        atol = 0.05 if path.suffix == ".jpg" else 1e-4
        np.testing.assert_allclose(logits[files.index(str(path.resolve()))], want, atol=atol)
