"""A real ``.tflite`` model written with the TFLite flatbuffer schema that ``ai-edge-litert``
ships (no TensorFlow needed): the same classifier as ``converters.onnx.samples.mlp_classifier``
with the same weights, so LiteRT and onnxruntime can be compared on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.onnx.samples import mlp_weights


def mlp_classifier_tflite(
    path: Path, *, features: int = 16, hidden: int = 32, classes: int = 4, seed: int = 0
) -> Path:
    """x[N, features] → probs[N, classes]: FULLY_CONNECTED+RELU → FULLY_CONNECTED → SOFTMAX."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    w1, b1, w2, b2 = mlp_weights(features, hidden, classes, seed)
    model = s.ModelT()
    model.version = 3
    model.description = "edgefleet sample classifier"
    model.buffers = [s.BufferT()]  # buffer 0 is the empty one by convention
    model.operatorCodes = []

    def buffer(arr: np.ndarray) -> int:
        b = s.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
        model.buffers.append(b)
        return len(model.buffers) - 1

    def op_code(op: int) -> int:
        code = s.OperatorCodeT()
        code.builtinCode = op
        code.deprecatedBuiltinCode = min(op, 127)
        code.version = 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    tensors: list[s.TensorT] = []

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        t = s.TensorT()
        t.name = name
        t.type = s.TensorType.FLOAT32
        t.shape = np.array(shape, dtype=np.int32)
        t.shapeSignature = np.array([-1, *shape[1:]] if data is None else shape, dtype=np.int32)
        t.buffer = buffer(data) if data is not None else 0
        tensors.append(t)
        return len(tensors) - 1

    x = tensor("x", [1, features])
    w1t = tensor("w1", [hidden, features], w1.T.copy())  # TFLite: [out, in]
    b1t = tensor("b1", [hidden], b1)
    h = tensor("h", [1, hidden])
    w2t = tensor("w2", [classes, hidden], w2.T.copy())
    b2t = tensor("b2", [classes], b2)
    logits = tensor("logits", [1, classes])
    probs = tensor("probs", [1, classes])

    def fully_connected(inputs: list[int], out: int, activation: int) -> s.OperatorT:
        op = s.OperatorT()
        op.opcodeIndex = fc
        op.inputs, op.outputs = np.array(inputs, np.int32), np.array([out], np.int32)
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = s.FullyConnectedOptionsT()
        op.builtinOptions.fusedActivationFunction = activation
        return op

    fc = op_code(s.BuiltinOperator.FULLY_CONNECTED)
    softmax_code = op_code(s.BuiltinOperator.SOFTMAX)
    softmax = s.OperatorT()
    softmax.opcodeIndex = softmax_code
    softmax.inputs, softmax.outputs = np.array([logits], np.int32), np.array([probs], np.int32)
    softmax.builtinOptionsType = s.BuiltinOptions.SoftmaxOptions
    softmax.builtinOptions = s.SoftmaxOptionsT()
    softmax.builtinOptions.beta = 1.0

    graph = s.SubGraphT()
    graph.name = "main"
    graph.tensors = tensors
    graph.inputs = np.array([x], np.int32)
    graph.outputs = np.array([probs], np.int32)
    graph.operators = [
        fully_connected([x, w1t, b1t], h, s.ActivationFunctionType.RELU),
        fully_connected([h, w2t, b2t], logits, s.ActivationFunctionType.NONE),
        softmax,
    ]
    model.subgraphs = [graph]
    path.parent.mkdir(parents=True, exist_ok=True)
    flatbuffer_utils.write_model(model, str(path))
    return path
