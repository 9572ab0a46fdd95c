"""Small, real ONNX models built with ``onnx.helper``, for the demo, examples and tests.

They are genuine models (a softmax classifier MLP and a small CNN), deterministic for a seed,
so their outputs can be compared exactly across runtimes and devices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def mlp_weights(
    features: int, hidden: int, classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sample classifier's weights (shared with the TFLite sample)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(classes) * 0.1).astype(np.float32)
    return w1, b1, w2, b2


def mlp_classifier(
    path: Path,
    *,
    features: int = 16,
    hidden: int = 32,
    classes: int = 4,
    seed: int = 0,
    opset: int = 17,
) -> Path:
    """x[N, features] → probs[N, classes] (Gemm → Relu → Gemm → Softmax)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = mlp_weights(features, hidden, classes, seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "mlp_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-samples"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _save(graph: object, path: Path, opset: int = 17) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph,  # type: ignore[arg-type]
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="edgefleet-samples",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def nan_classifier(path: Path, *, features: int = 16, classes: int = 4) -> Path:
    """Same interface as :func:`mlp_classifier`, but every output is NaN (0/0 inside): a
    broken model that loads and passes its own self-test, for probation to catch."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((features, classes), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "x"], ["zero"]),
            helper.make_node("Div", ["zero", "zero"], ["nan"]),
            helper.make_node("MatMul", ["nan", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "nan_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w, "w")],
    )
    return _save(graph, path)


def slow_classifier(
    path: Path,
    *,
    features: int = 16,
    classes: int = 4,
    seed: int = 0,
    width: int = 512,
    depth: int = 24,
) -> Path:
    """Same interface and outputs as ``mlp_classifier(seed=seed)``, plus a chain of
    ``depth`` (width, width) matmuls whose result is multiplied by zero: many times slower,
    numerically the same."""
    import onnx
    from onnx import helper, numpy_helper

    base = mlp_classifier(
        path.with_suffix(".base.onnx"), features=features, classes=classes, seed=seed
    )
    model = onnx.load(str(base))
    base.unlink()
    g = model.graph
    rng = np.random.default_rng(seed + 1)
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal((features, width)) * 0.01).astype(np.float32), "s_in"
        )
    ]
    nodes = [helper.make_node("MatMul", ["x", "s_in"], ["s0"])]
    for i in range(depth):
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((width, width)) * 0.01).astype(np.float32), f"s_w{i}"
            )
        )
        nodes.append(helper.make_node("MatMul", [f"s{i}", f"s_w{i}"], [f"s{i + 1}"]))
    inits.append(numpy_helper.from_array(np.zeros((width, classes), np.float32), "s_out"))
    nodes.append(helper.make_node("MatMul", [f"s{depth}", "s_out"], ["s_zero"]))
    # Rewire: logits → logits + s_zero, before the softmax.
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    softmax.input[0] = "slow_logits"
    nodes.append(helper.make_node("Add", ["logits", "s_zero"], ["slow_logits"]))
    graph = helper.make_graph(
        [n for n in g.node if n is not softmax] + nodes + [softmax],
        "slow_classifier",
        list(g.input),
        list(g.output),
        list(g.initializer) + inits,
    )
    return _save(graph, path)
