"""Converters on real models in real runtimes: dataset checks, the parity gate, candidate
selection, int8 quantization (x86 and TensorRT flavours), bundle contents, and TensorRT code
paths that run without a GPU."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converters.build import BuildOptions, build_bundle, candidates
from converters.data import Dataset, as_feeds, split_holdout, synthetic_dataset
from converters.onnx import inspect_onnx
from converters.onnx.samples import mlp_classifier
from converters.validate import Outputs, Thresholds, compare
from edge_agent.bundle.manifest import TensorSpec
from edge_agent.bundle.selftest import unpack
from edge_agent.contracts.errors import ConversionError, RuntimeBackendError
from edge_agent.runtimes import LoadOptions, get_runtime
from edge_agent.runtimes.tensorrt import Recipe, engine_key
from firmware_profiles import default_catalog

CATALOG = default_catalog()
X = [TensorSpec(name="x", dtype="float32", shape=["batch", 16])]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_classifier(tmp_path_factory.mktemp("m") / "m.onnx", seed=3)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
    return path


def _build(model: Path, profile: str, out: Path, **kw: object) -> object:
    info = inspect_onnx(model)
    return build_bundle(
        source=model,
        source_sha256="0" * 64,
        name="m",
        version="1.0.0",
        inputs=info.inputs,
        outputs=info.outputs,
        profile=CATALOG.get(profile),
        out_path=out,
        **kw,
    )


# --- datasets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({}, "no array for input(s) ['x']"),
        ({"x": np.zeros((4, 16), np.float32), "y": np.zeros(4)}, "array(s) ['y'] match no"),
        ({"x": np.zeros((4, 16), np.float64)}, "has dtype float64, the model takes float32"),
        ({"x": np.zeros((4, 15), np.float32)}, "has size 15 on axis 1, the model takes 16"),
        ({"x": np.zeros((16,), np.float32)}, "expected [samples, batch, 16]"),
        ({"x": np.zeros((2, 3, 4, 16), np.float32)}, "expected [samples, batch, 16]"),
        ({"x": np.float32(3.0)}, "is a single value; stack the samples"),
        ({"x": np.zeros((0, 16), np.float32)}, "it holds no samples"),
        ({"x": np.full((2, 16), np.nan, np.float32)}, "NaN or infinite"),
    ],
)
def test_bad_calibration_sets_are_named(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ConversionError) as e:
        as_feeds(arrays, X, what="calibration")
    assert message in e.value.message and e.value.message.startswith("calibration set:")
    assert e.value.reason == "bad_dataset"


STATEFUL = [
    TensorSpec(name="audio", dtype="float32", shape=["batch", 80]),
    TensorSpec(name="h0", dtype="float32", shape=[2, "batch", 32]),
    TensorSpec(name="sample_rate", dtype="int64", shape=[]),
]


def test_one_sample_is_one_complete_feed_of_any_rank() -> None:
    arrays = {
        "audio": np.zeros((5, 1, 80), np.float32),
        "h0": np.zeros((5, 2, 1, 32), np.float32),
        "sample_rate": np.full(5, 16000, np.int64),
    }
    feeds = list(Dataset(as_feeds(arrays, STATEFUL, what="calibration"), "uploaded").feeds())
    assert len(feeds) == 5
    assert {k: v.shape for k, v in feeds[0].items()} == {
        "audio": (1, 80), "h0": (2, 1, 32), "sample_rate": (),
    }  # fmt: skip


def test_a_state_input_is_not_read_as_rows() -> None:
    """[2, batch, 32] leads with the layers: a [samples, 1, 32] array is not one of its feeds
    with the batch removed, and is refused naming the layout to use."""
    arrays = {
        "audio": np.zeros((5, 1, 80), np.float32),
        "h0": np.zeros((5, 1, 32), np.float32),
        "sample_rate": np.full(5, 16000, np.int64),
    }
    with pytest.raises(ConversionError, match=r"expected \[samples, 2, batch, 32\]"):
        as_feeds(arrays, STATEFUL, what="calibration")


def test_earlier_row_files_still_read_where_unambiguous() -> None:
    rows = {"x": np.arange(64, dtype=np.float32).reshape(4, 16)}
    feeds = as_feeds(rows, X, what="calibration")["x"]
    assert feeds.shape == (4, 1, 16) and feeds[2, 0, 0] == 32


def test_synthetic_feeds_fit_state_and_scalar_inputs() -> None:
    data = synthetic_dataset(STATEFUL, 3)
    feed = next(data.feeds())
    assert {k: v.shape for k, v in feed.items()} == {
        "audio": (1, 80),
        "h0": (2, 1, 32),
        "sample_rate": (),
    }
    as_feeds(data.arrays, STATEFUL, what="synthetic")  # what it makes, it accepts


def test_holdout_keeps_a_quarter_for_validation() -> None:
    data = Dataset({"x": np.arange(48, dtype=np.float32).reshape(12, 4)}, "uploaded", "ab")
    calib, valid = split_holdout(data)
    assert (calib.samples, valid.samples) == (9, 3) and valid.origin == "held-out calibration"
    assert valid.arrays["x"][0, 0] == 36


# --- the gate ------------------------------------------------------------------------------------


def _outputs(array: np.ndarray) -> Outputs:
    """Rows as the gate sees a classifier's outputs: stacked per sample, a batch of 1 each."""
    return Outputs({"y": array[:, None, :] if array.ndim == 2 else array}, [1.0, 2.0, 3.0])


def test_gate_reports_each_failed_check_with_numbers(tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    artifact.write_bytes(b"x" * 10)
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], np.float32)
    got = np.array([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1]], np.float32)  # one of three flips
    report = compare(
        _outputs(ref), _outputs(got),
        thresholds=Thresholds(max_abs_error=0.5, max_rel_l2=None, min_top1_agreement=0.9),
        artifact=artifact, source_size=20, samples=3, origin="uploaded", evaluated_in="test",
    )  # fmt: skip
    assert not report["passed"]
    assert report["failed"] == ["max_abs_error 1 > 0.5", "min_top1_agreement 0.6667 < 0.9"]
    assert report["top1_agreement"] == pytest.approx(2 / 3) and report["size_ratio"] == 0.5
    assert [c["name"] for c in report["checks"]] == ["max_abs_error", "min_top1_agreement"]


def test_gate_fails_nan_only_where_the_original_is_finite(tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    artifact.write_bytes(b"x")
    finite = np.ones((2, 3), np.float32)
    nan = np.full((2, 3), np.nan, np.float32)
    kw = dict(
        thresholds=Thresholds(max_abs_error=1.0), artifact=artifact, source_size=1, samples=2,
        origin="synthetic", evaluated_in="test",
    )  # fmt: skip
    broken = compare(_outputs(finite), _outputs(nan), **kw)  # type: ignore[arg-type]
    assert not broken["passed"] and "NaN or infinite" in broken["failed"][0]
    same = compare(_outputs(nan), _outputs(nan), **kw)  # type: ignore[arg-type]
    assert same["passed"]


def test_int8_thresholds_come_from_the_profile_and_can_be_overridden() -> None:
    parity = CATALOG.get("x86-64-avx2").parity
    assert parity.for_precision("int8")["max_abs_error"] is None  # inf in the TOML: off
    assert parity.for_precision("fp32")["max_abs_error"] == 0.05
    merged = Thresholds(**parity.for_precision("int8")).merged({"min_top1_agreement": 1.0})
    assert merged.min_top1_agreement == 1.0
    with pytest.raises(ConversionError, match="unknown parity threshold"):
        Thresholds().merged({"top5": 0.9})


# --- candidates and builds ----------------------------------------------------------------------


def test_candidates_follow_the_profile_and_the_device_runtimes() -> None:
    orin = CATALOG.get("jetson-orin-nano")
    assert [(c.runtime, c.precision) for c in candidates(orin)] == [
        ("tensorrt", "int8"), ("tensorrt", "fp16"), ("tensorrt", "fp32"), ("onnxruntime", "fp32"),
    ]  # fmt: skip
    only = candidates(orin, BuildOptions(runtimes=("onnxruntime", "litert")))
    assert [(c.runtime, c.precision) for c in only] == [("onnxruntime", "fp32")]
    with pytest.raises(ConversionError, match="no runtime/precision"):
        candidates(CATALOG.get("x86-64-avx2"), BuildOptions(runtimes=("tensorrt",)))


def test_x86_int8_is_chosen_with_calibration_and_bundles_everything(
    model: Path, calibration: Path, tmp_path: Path
) -> None:
    result = _build(model, "x86-64-avx2", tmp_path / "b.efb", calibration=calibration)
    m = result.manifest  # type: ignore[attr-defined]
    assert (m.runtime.name, m.precision) == ("onnxruntime", "int8")
    chosen = m.parity["chosen"]
    assert chosen["passed"] and chosen["validation"] == {
        "samples": 16,
        "origin": "held-out calibration",
    }
    assert chosen["top1_agreement"] >= 0.99 and chosen["size_bytes"] > 0
    assert {f.path for f in m.files} == {"model/model.onnx", "selftest.npz", "baseline.json"}
    assert m.toolchain["onnxruntime"] and m.toolchain["edgefleet"]
    with tarfile.open(tmp_path / "b.efb") as tar:
        baseline = json.loads(tar.extractfile("baseline.json").read())  # type: ignore[union-attr]
        selftest = tar.extractfile("selftest.npz").read()  # type: ignore[union-attr]
        model_bytes = tar.extractfile("model/model.onnx").read()  # type: ignore[union-attr]
    assert (
        baseline["inputs"]["x"]["count"] == 48 * 16
        and len(baseline["inputs"]["x"]["histogram"]) == 10
    )
    assert sum(baseline["outputs"]["probs"]["top1_frequencies"]) == pytest.approx(1.0)
    # Self-test vectors are the compiled (int8) model's outputs, not the fp32 original's.
    art = tmp_path / "int8.onnx"
    art.write_bytes(model_bytes)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(art)).graph.node)
    (tmp_path / "selftest.npz").write_bytes(selftest)
    feeds, expected = unpack(tmp_path / "selftest.npz")
    loaded = get_runtime("onnxruntime").load(art, LoadOptions(threads=1))
    np.testing.assert_array_equal(loaded.run(feeds)["probs"], expected["probs"])


def test_a_failed_gate_falls_back_and_says_why(
    model: Path, calibration: Path, tmp_path: Path
) -> None:
    result = _build(
        model, "x86-64-avx2", tmp_path / "b.efb", calibration=calibration,
        options=BuildOptions(thresholds={"max_rel_l2": 1e-6}),
    )  # fmt: skip
    m = result.manifest  # type: ignore[attr-defined]
    assert m.precision == "fp32"
    (rejected,) = m.parity["rejected"]
    assert rejected["precision"] == "int8" and rejected["failed"][0].startswith("max_rel_l2 ")
    assert result.passed_over[0].startswith("onnxruntime/int8: max_rel_l2 ")  # type: ignore[attr-defined]


def test_nothing_passing_is_an_error_listing_every_candidate(
    model: Path, calibration: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b.efb"
    with pytest.raises(ConversionError) as e:
        _build(
            model, "x86-64-avx2", out, calibration=calibration,
            options=BuildOptions(thresholds={"max_rel_l2": 1e-9}, precisions=("int8",)),
        )  # fmt: skip
    assert e.value.reason == "no_artifact" and "onnxruntime/int8: max_rel_l2" in e.value.message
    assert e.value.fields["candidates"][0]["outcome"] == "failed"
    assert not out.exists()


def test_a_model_over_the_profile_budget_is_refused_before_converting(
    model: Path, tmp_path: Path
) -> None:
    x86 = CATALOG.get("x86-64-avx2")
    tiny = x86.replace(resources=x86.resources.replace(max_bundle_bytes=100))
    info = inspect_onnx(model)
    with pytest.raises(
        ConversionError, match=r"over the bundle budget of profile x86-64-avx2 \(100 bytes\)"
    ):
        build_bundle(
            source=model, source_sha256="0" * 64, name="m", version="1.0.0", inputs=info.inputs,
            outputs=info.outputs, profile=tiny, out_path=tmp_path / "b.efb",
        )  # fmt: skip
    assert not (tmp_path / "b.efb").exists()


# --- custom operators in TFLite ------------------------------------------------------------------


def _tflite_with_custom_op(path: Path, custom: str | None) -> Path:
    """A minimal .tflite written with the schema's object API: ADD, then (optionally) a custom
    op, the way a converter leaves an ONNX ``If`` it could not lower."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    def code(builtin: int, custom_code: bytes | None) -> object:
        c = s.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), 1
        c.customCode = custom_code
        return c

    def tensor(name: bytes) -> object:
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = [1, 16], s.TensorType.FLOAT32, 0, name
        return t

    def op(index: int, inputs: list[int], outputs: list[int]) -> object:
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = index, inputs, outputs
        return o

    model = s.ModelT()
    model.version, model.buffers = 3, [s.BufferT()]
    model.operatorCodes = [code(s.BuiltinOperator.ADD, None)]
    graph = s.SubGraphT()
    graph.name, graph.tensors, graph.inputs = b"main", [tensor(b"x"), tensor(b"y")], [0]
    graph.operators = [op(0, [0, 0], [1])]
    if custom is not None:
        model.operatorCodes.append(code(s.BuiltinOperator.CUSTOM, custom.encode()))
        graph.tensors.append(tensor(b"z"))
        graph.operators.append(op(1, [1], [2]))
    graph.outputs = [len(graph.tensors) - 1]
    model.subgraphs = [graph]
    flatbuffer_utils.write_model(model, str(path))
    return path


def test_custom_ops_are_found_in_the_flatbuffer(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    from converters.tflite.convert import custom_ops

    assert custom_ops(_tflite_with_custom_op(tmp_path / "if.tflite", "If")) == ["If"]
    assert custom_ops(_tflite_with_custom_op(tmp_path / "plain.tflite", None)) == []


def test_a_custom_op_left_by_a_converter_that_exited_0_is_named_and_not_bundled(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter (a fake with the real interface, standing in for onnx2tf) succeeds but
    leaves an ``If`` custom op: the build must refuse that artifact by naming the op."""
    pytest.importorskip("ai_edge_litert")
    import converters.tflite.convert as tflite
    import converters.toolchains as toolchains

    leftover = _tflite_with_custom_op(tmp_path / "model_float32.tflite", "If")
    monkeypatch.setattr(
        toolchains, "locate", lambda name: toolchains.Toolchain(name, tmp_path, {"onnx2tf": "x"})
    )
    monkeypatch.setattr(
        tflite, "convert", lambda *a, **kw: tflite.TfliteOutputs(fp32=leftover, int8=None)
    )
    out = tmp_path / "b.efb"
    with pytest.raises(ConversionError) as e:
        _build(
            model, "raspberry-pi-4", out,
            options=BuildOptions(runtimes=("litert",), precisions=("fp32",)),
        )  # fmt: skip
    assert e.value.reason == "no_artifact"
    (candidate,) = e.value.fields["candidates"]
    assert candidate["outcome"] == "error"
    assert "operator(s) LiteRT cannot run: If" in candidate["error"]
    assert not out.exists()


def test_litert_fp32_is_judged_apart_from_a_failed_int8(
    model: Path, calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx2tf wrote the fp32 model but not the int8 one (a stand-in with the real
    interface): the int8 candidate is rejected with the int8 reason, the fp32 one is judged
    on its own and bundled."""
    pytest.importorskip("ai_edge_litert")
    import converters.tflite.convert as tflite
    import converters.toolchains as toolchains
    from converters.tflite.samples import mlp_classifier_tflite

    fp32 = mlp_classifier_tflite(tmp_path / "model_float32.tflite", seed=3)  # = the ONNX model
    monkeypatch.setattr(
        toolchains, "locate", lambda name: toolchains.Toolchain(name, tmp_path, {"onnx2tf": "x"})
    )
    monkeypatch.setattr(
        tflite,
        "convert",
        lambda *a, **kw: tflite.TfliteOutputs(
            fp32=fp32, int8=None, int8_error="onnx2tf wrote the fp32 model but no int8 one: X"
        ),
    )
    result = _build(
        model, "raspberry-pi-4", tmp_path / "b.efb", calibration=calibration,
        options=BuildOptions(runtimes=("litert",)),
    )  # fmt: skip
    assert (result.target.runtime, result.target.precision) == ("litert", "fp32")  # type: ignore[attr-defined]
    assert result.passed_over == ["litert/int8: onnx2tf wrote the fp32 model but no int8 one: X"]  # type: ignore[attr-defined]


# --- TensorRT -----------------------------------------------------------------------------------


def test_jetson_int8_is_symmetric_qdq_onnx_with_a_recipe(
    model: Path, calibration: Path, tmp_path: Path
) -> None:
    result = _build(
        model, "jetson-orin-nano", tmp_path / "b.efb", calibration=calibration,
        options=BuildOptions(thresholds={"min_top1_agreement": 0.9}),
    )  # fmt: skip
    m = result.manifest  # type: ignore[attr-defined]
    assert (m.runtime.name, m.precision) == ("tensorrt", "int8")
    assert "host proxy" in m.parity["chosen"]["evaluated_in"]
    with tarfile.open(tmp_path / "b.efb") as tar:
        recipe = json.loads(tar.extractfile("model/trt_recipe.json").read())  # type: ignore[union-attr]
        qdq = onnx.load_from_string(tar.extractfile("model/model.onnx").read())  # type: ignore[union-attr]
    assert recipe["flags"] == ["FP16", "INT8"] and recipe["dla_core"] == -1
    assert recipe["shapes"] == {"x": {"min": [1, 16], "opt": [1, 16], "max": [8, 16]}}
    zero_points = [
        numpy_helper.to_array(i) for i in qdq.graph.initializer if "zero_point" in i.name
    ]
    # Symmetric: every zero point is 0, and activations are int8 (never uint8).
    assert zero_points and all(not z.any() and z.dtype != np.uint8 for z in zero_points)


def test_tensorrt_backend_says_what_is_missing_and_keys_engines(tmp_path: Path) -> None:
    backend = get_runtime("tensorrt")
    assert backend.version() is None  # not installable on these machines
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    recipe = Recipe(precision="fp16", flags=["FP16"], workspace_mb=512)
    (tmp_path / "trt_recipe.json").write_text(recipe.to_json())
    with pytest.raises(RuntimeBackendError) as e:
        backend.load(tmp_path / "model.onnx", LoadOptions())
    assert e.value.reason == "runtime_missing" and "TensorRT is not installed" in e.value.message
    assert Recipe.load(tmp_path / "trt_recipe.json") == recipe
    a = engine_key(tmp_path / "model.onnx", tmp_path / "trt_recipe.json", "8.7", "10.3.0")
    assert a.startswith("sm87-trt10.3.0-")
    assert a != engine_key(tmp_path / "model.onnx", tmp_path / "trt_recipe.json", "7.2", "10.3.0")
    (tmp_path / "trt_recipe.json").write_text("{bad")
    with pytest.raises(RuntimeBackendError, match="bad TensorRT recipe"):
        Recipe.load(tmp_path / "trt_recipe.json")


@pytest.mark.gpu
def test_tensorrt_engine_builds_and_matches_the_host_proxy(
    model: Path, calibration: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson / CUDA hosts only)")
    from edge_agent.runtimes.tensorrt import TensorRt

    _build(model, "jetson-orin-nano", tmp_path / "b.efb", calibration=calibration)
    with tarfile.open(tmp_path / "b.efb") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    loaded = TensorRt().load(tmp_path / "x/model/model.onnx", LoadOptions(cache_dir=tmp_path / "c"))
    feeds, expected = unpack(tmp_path / "x/selftest.npz")
    np.testing.assert_allclose(loaded.run(feeds)["probs"], expected["probs"], atol=0.1)


def test_declared_output_kinds_get_fitting_measures(tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    artifact.write_bytes(b"x")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 1, 8))
    scaled = vectors * 1.3  # same directions, 30 % off in value
    boxes = np.array([[[0, 0, 10, 10]], [[5, 5, 15, 15]]], np.float64)
    moved = boxes + np.array([[[1, 1, 1, 1]], [[8, 8, 8, 8]]])  # one keeps IoU > 0.5, one not
    ref = Outputs({"emb": vectors, "box": boxes}, [1.0])
    got = Outputs({"emb": scaled, "box": moved}, [1.0])
    report = compare(
        ref, got,
        thresholds=Thresholds(max_abs_error=None, max_rel_l2=0.05, min_box_recall=0.9),
        artifact=artifact, source_size=1, samples=6, origin="test", evaluated_in="test",
        kinds={"emb": "embedding", "box": "boxes"},
    )  # fmt: skip
    emb, box = report["outputs"]["emb"], report["outputs"]["box"]
    assert emb["kind"] == "embedding" and emb["min_cosine_similarity"] == pytest.approx(1.0)
    assert box["kind"] == "boxes" and box["box_recall"] == 0.5
    # The embedding's 30 % value error does not fail it: direction is its measure.
    assert report["failed"] == ["min_box_recall 0.5 < 0.9"]
    # Every output is judged by its own measure: no absolute or relative error check is
    # recorded as passed (it judged nothing), and the report says so with None.
    assert [c["name"] for c in report["checks"]] == ["min_cosine_similarity", "min_box_recall"]
    assert report["max_abs_error"] is None and report["rel_l2_error"] is None


def test_an_undeclared_output_beside_class_scores_is_judged_by_error(tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    artifact.write_bytes(b"x")
    probs = np.array([[[0.7, 0.2, 0.1]], [[0.1, 0.8, 0.1]]])
    value = np.array([[[1.0]], [[2.0]]])
    ref = Outputs({"probs": probs, "value": value}, [1.0])
    got = Outputs({"probs": probs + 0.05, "value": value * 1.2}, [1.0])
    report = compare(
        ref, got, thresholds=Thresholds(max_abs_error=None, max_rel_l2=0.05),
        artifact=artifact, source_size=1, samples=2, origin="test", evaluated_in="test",
        kinds={"probs": "class_scores"},
    )  # fmt: skip
    # The class scores (5 % off) are judged by top-1; the regression output's 20 % fails.
    assert report["rel_l2_error"] == pytest.approx(0.2)
    assert report["failed"] == ["max_rel_l2 0.2 > 0.05"]
