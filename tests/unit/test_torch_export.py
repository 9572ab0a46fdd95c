"""The PyTorch export helper on a real module (torch is a dev dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.onnx import inspect_onnx


def test_export_gives_a_dynamic_batch_onnx_that_agrees_with_the_module(tmp_path: Path) -> None:
    import onnxruntime
    import torch

    from converters.torch_export import export

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    path = export(
        module, [torch.randn(1, 3, 16, 16)], tmp_path / "m.onnx",
        input_names=["image"], output_names=["logits"],
    )  # fmt: skip
    info = inspect_onnx(path)
    assert [s.name for s in info.inputs] == ["image"] and info.inputs[0].shape[0] == "batch"
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"image": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
