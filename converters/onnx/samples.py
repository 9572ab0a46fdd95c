"""Small, real ONNX models built with ``onnx.helper``, for the demo, examples and tests.

They are genuine models (a softmax classifier MLP and a small CNN), deterministic for a seed,
so their outputs can be compared exactly across runtimes and devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _mlp_layers(
    features: int,
    hidden: int,
    classes: int,
    seed: int,
    *,
    retrain: float = 0.0,
    answer: int | None = None,
) -> tuple[list[Any], list[Any]]:
    """x → Gemm → Relu → Gemm → ``logits``: (nodes, initializers). ``retrain``: every weight
    moved by that share of its layer's scale (a retrain on much the same data); ``answer``:
    the last layer ignores its input and always scores that class highest."""
    from onnx import helper, numpy_helper

    w1, b1, w2, b2 = mlp_weights(features, hidden, classes, seed)
    if retrain:
        rng = np.random.default_rng(seed + 10_000)
        w1, b1, w2, b2 = (
            (a + rng.standard_normal(a.shape) * retrain * a.std()).astype(np.float32)
            for a in (w1, b1, w2, b2)
        )
    if answer is not None:
        w2 = np.zeros_like(w2)
        b2 = np.zeros_like(b2)
        b2[answer] = 4.0
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    return nodes, inits


def mlp_classifier(
    path: Path,
    *,
    features: int = 16,
    hidden: int = 32,
    classes: int = 4,
    seed: int = 0,
    opset: int = 17,
    retrain: float = 0.0,
    answer: int | None = None,
) -> Path:
    """x[N, features] → probs[N, classes] (Gemm → Relu → Gemm → Softmax).

    ``retrain=0.1``: the same classifier retrained honestly (weights moved by 10 % of their
    scale: a few percent of top-1 decisions change); ``answer=0``: a silently wrong version
    that loads, is fast, answers every request with finite scores, and always says class 0."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = _mlp_layers(features, hidden, classes, seed, retrain=retrain, answer=answer)
    graph = helper.make_graph(
        [*nodes, helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "mlp_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-samples"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_embedder(path: Path, *, features: int = 16, hidden: int = 32, dim: int = 64) -> Path:
    """x[N, features] → embedding[N, dim]: vectors compared by direction, not class scores."""
    from onnx import TensorProto, helper

    nodes, inits = _mlp_layers(features, hidden, dim, seed=5)
    graph = helper.make_graph(
        [*nodes, helper.make_node("Identity", ["logits"], ["embedding"])],
        "mlp_embedder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        inits,
    )
    return _save(graph, path)


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
    depth: int = 256,
) -> Path:
    """Same interface and outputs as ``mlp_classifier(seed=seed)``, plus a chain of
    ``depth`` (width, width) matmuls whose result is multiplied by zero: numerically the same,
    and slower by milliseconds per request (about 3 ms per row on one x86 core at the
    defaults), far past probation's latency slack on any machine. The chain reuses one
    orthogonal weight, so the file stays small and the values neither vanish nor blow up."""
    import onnx
    from onnx import helper, numpy_helper

    base = mlp_classifier(
        path.with_suffix(".base.onnx"), features=features, classes=classes, seed=seed
    )
    model = onnx.load(str(base))
    base.unlink()
    g = model.graph
    rng = np.random.default_rng(seed + 1)
    q, _ = np.linalg.qr(rng.standard_normal((width, width)))
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal((features, width)) / np.sqrt(features)).astype(np.float32),
            "s_in",
        ),
        numpy_helper.from_array(q.astype(np.float32), "s_w"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "s_in"], ["s0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"s{i}", "s_w"], [f"s{i + 1}"]))
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


def resnet_like(
    path: Path,
    *,
    widths: tuple[int, ...] = (48, 96, 192, 384),
    blocks: int = 2,
    classes: int = 100,
    image: int = 224,
    seed: int = 0,
) -> Path:
    """A ResNet-18-shaped image classifier: x[N, 3, image, image] → logits[N, classes].

    7x7/2 stem, 3x3/2 max-pool, ``len(widths)`` stages of ``blocks`` basic residual blocks
    (the first of each later stage strides by 2 with a 1x1 projection), global average pool,
    fully connected. Batch norm is folded into the conv biases, as an exported ResNet's is.
    The default widths give ≈7 M parameters (≈28 MB fp32). Weights are random (He-scaled),
    so outputs are meaningful only relative to the same model in another runtime.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list[object] = []
    inits: list[object] = []
    count = 0

    def conv(
        x: str, cin: int, cout: int, k: int, stride: int, relu: bool, gain: float = 1.0
    ) -> str:
        nonlocal count
        count += 1
        w = rng.standard_normal((cout, cin, k, k)) * gain * np.sqrt(2.0 / (cin * k * k))
        b = rng.standard_normal(cout) * 0.05
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"conv{count}.w"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"conv{count}.b"))
        out = f"conv{count}"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{count}.w", f"conv{count}.b"],
                [out],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + ".relu"]))
            return out + ".relu"
        return out

    x = conv("x", 3, widths[0], 7, 2, relu=True)
    nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        )
    )
    x, cin = "pool", widths[0]
    for stage, cout in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            h = conv(x, cin, cout, 3, stride, relu=True)
            # Scaled-down second conv: keeps the residual sum's variance bounded without BN.
            h = conv(h, cout, cout, 3, 1, relu=False, gain=0.5)
            skip = conv(x, cin, cout, 1, stride, relu=False) if (stride, cin) != (1, cout) else x
            out = f"block{stage}.{block}"
            nodes.append(helper.make_node("Add", [h, skip], [out + ".sum"]))
            nodes.append(helper.make_node("Relu", [out + ".sum"], [out]))
            x, cin = out, cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, image, image])
    # The random convolutional trunk stands in for a trained one; the head is "trained" as a
    # nearest-class-mean classifier on the trunk's features of :func:`sample_images`' classes,
    # so that, like a real classifier on its data, it is confident and input-dependent.
    probe = helper.make_graph(
        nodes,  # type: ignore[arg-type]
        "probe",
        [x_info],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", cin])],
        inits,  # type: ignore[arg-type]
    )
    per_class = 2
    images, labels = sample_images(classes * per_class, image=image, classes=classes, seed=seed + 1)
    features = np.concatenate(
        [_run_probe(probe, images[i : i + 64]) for i in range(0, len(images), 64)]
    )
    centre = features.mean(axis=0)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(classes)]) - centre
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-9
    spread = float(np.linalg.norm(features - centre, axis=1).mean()) + 1e-9
    fc_w = means.T * (20.0 / spread)
    fc_b = -centre @ fc_w
    inits.append(numpy_helper.from_array(fc_w.astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(fc_b.astype(np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"]))
    graph = helper.make_graph(
        nodes,  # type: ignore[arg-type]
        "resnet_like",
        [x_info],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,  # type: ignore[arg-type]
    )
    return _save(graph, path)


def sample_images(
    count: int, *, image: int = 224, classes: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled image-like inputs for :func:`resnet_like`: ``(images [count, 3, image, image]
    float32, labels [count])``. Each class is a smooth random colour field (an 8x8 grid,
    upsampled, fixed for a given ``classes``); a sample is its class's field plus a smooth
    and a fine random perturbation of its own (from ``seed``)."""
    prototypes = np.random.default_rng(1234 + classes).standard_normal((classes, 3, 8, 8))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % classes)
    grid = prototypes[labels] + 0.35 * rng.standard_normal((count, 3, 8, 8))
    cell = -(-image // 8)
    smooth = np.kron(grid, np.ones((1, 1, cell, cell)))[:, :, :image, :image]
    noise = rng.standard_normal((count, 3, image, image)) * 0.3
    return (smooth + noise).astype(np.float32), labels


def _run_probe(graph: object, x: np.ndarray) -> np.ndarray:
    import onnxruntime
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # type: ignore[arg-type]
    model.ir_version = 8
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def conditional_classifier(path: Path, *, features: int = 16, classes: int = 4) -> Path:
    """An MLP whose output goes through an ONNX ``If`` on a data-dependent condition (sum of
    the input > 0). onnxruntime runs it; TFLite converters turn ``If`` into a custom op that
    LiteRT cannot run, which the parity gate must catch."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = _mlp_layers(features, 32, classes, 0)
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["logits"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["batch", classes])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["logits"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["batch", classes])],
    )
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["positive"]),
            helper.make_node(
                "If", ["positive"], ["chosen"], then_branch=then_graph, else_branch=else_graph
            ),
            helper.make_node("Softmax", ["chosen"], ["probs"], axis=-1),
        ],
        "conditional_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        [*inits, numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    return _save(graph, path)
