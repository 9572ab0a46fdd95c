"""The demo's model: a small convolutional network that reads handwritten-style digits,
trained on the spot (NumPy, a few seconds) and exported to ONNX.

The digits are drawn with the DejaVu fonts matplotlib ships (so nothing is downloaded):
each one rotated, scaled, shifted, sometimes thickened, dimmed and noised, on a 16x16 grid, white
on black. The network: conv 3x3 (8) → ReLU → max-pool 2 → conv 3x3 (16) → ReLU → max-pool 2
→ dense 256→10 → softmax; input ``image`` ``[batch, 1, 16, 16]`` float32 in 0..1, output
``probs`` ``[batch, 10]``.

:func:`fold_scale` makes the demo's silently wrong version: the same network with a
normalisation folded into its first layer a second time (it now expects pixels in 0..255, as
a training pipeline that forgot the ``/ 255`` would). It loads, passes its self-test and its
build's parity check (both compare it with itself), answers finite, confident
probabilities, and is wrong on almost everything a device sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 16
CLASSES = 10
_CANVAS = 40


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # [N, 1, 16, 16] float32, 0..1
    labels: np.ndarray  # [N] int64


def _fonts() -> list[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
             "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
             "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Italic.ttf"]  # fmt: skip
    found = [root / n for n in names if (root / n).exists()]
    if not found:
        raise FileNotFoundError(f"no DejaVu font under {root} (matplotlib ships them)")
    return found


def draw_digits(n: int, seed: int) -> Digits:
    """``n`` digits, classes balanced, each drawn differently."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = np.random.default_rng(seed)
    fonts = _fonts()
    labels = np.arange(n) % CLASSES
    rng.shuffle(labels)
    images = np.empty((n, 1, SIZE, SIZE), np.float32)
    cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    for i, label in enumerate(labels):
        font_i, size = int(rng.integers(len(fonts))), int(rng.integers(22, 31))
        font = cache.get((font_i, size))
        if font is None:
            font = cache[(font_i, size)] = ImageFont.truetype(str(fonts[font_i]), size)
        canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), str(label), font=font)
        at = ((_CANVAS - (right - left)) / 2 - left, (_CANVAS - (bottom - top)) / 2 - top)
        draw.text(at, str(label), fill=255, font=font)
        if rng.random() < 0.3:  # a thicker pen
            canvas = canvas.filter(ImageFilter.MaxFilter(3))
        canvas = canvas.rotate(
            float(rng.uniform(-10, 10)),
            resample=Image.Resampling.BILINEAR,
            translate=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))),
        )
        small = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        pixels = np.asarray(small, np.float32) / 255.0
        pixels = pixels * rng.uniform(0.75, 1.0) + rng.normal(0, 0.04, pixels.shape)
        images[i, 0] = np.clip(pixels, 0.0, 1.0)
    return Digits(images, labels.astype(np.int64))


# --- the network, by hand: forward, backward, Adam ------------------------------------------


def _im2col(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] → [N*H*W, C*9]: each output position's 3x3 neighbourhood (padding 1)."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, c, 3, 3, h, w), x.dtype)
    for i in range(3):
        for j in range(3):
            cols[:, :, i, j] = padded[:, :, i : i + h, j : j + w]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * h * w, c * 9)


def _col2im(cols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, c, h, w = shape
    parts = cols.reshape(n, h, w, c, 3, 3).transpose(0, 3, 4, 5, 1, 2)
    padded = np.zeros((n, c, h + 2, w + 2), cols.dtype)
    for i in range(3):
        for j in range(3):
            padded[:, :, i : i + h, j : j + w] += parts[:, :, i, j]
    return padded[:, :, 1:-1, 1:-1]


def _pool(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // 2, 2, w // 2, 2)
    out = blocks.max(axis=(3, 5))
    mask = blocks == out[:, :, :, None, :, None]
    mask = mask / mask.sum(axis=(3, 5), keepdims=True)  # ties share the gradient
    return out, mask


def _unpool(d: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n, c, h, _, w, _ = mask.shape
    out: np.ndarray = (mask * d[:, :, :, None, :, None]).reshape(n, c, h * 2, w * 2)
    return out


class Network:
    """Weights in ONNX's layouts: conv ``[out, in, 3, 3]``, dense ``[256, 10]``."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)

        def he(fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
            drawn: np.ndarray = rng.standard_normal(shape) * np.sqrt(2 / fan_in)
            return drawn

        self.params = {
            "w1": he(9, (8, 1, 3, 3)).astype(np.float32),
            "b1": np.zeros(8, np.float32),
            "w2": he(72, (16, 8, 3, 3)).astype(np.float32),
            "b2": np.zeros(16, np.float32),
            "w3": he(256, (256, CLASSES)).astype(np.float32),
            "b3": np.zeros(CLASSES, np.float32),
        }

    def _conv(self, x: np.ndarray, w: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        n, _, h, wd = x.shape
        cols = _im2col(x)
        weights = self.params[w]
        out = cols @ weights.reshape(weights.shape[0], -1).T + self.params[b]
        return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), cols

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        z1, cols1 = self._conv(x, "w1", "b1")
        a1 = np.maximum(z1, 0)
        p1, m1 = _pool(a1)
        z2, cols2 = self._conv(p1, "w2", "b2")
        a2 = np.maximum(z2, 0)
        p2, m2 = _pool(a2)
        flat = p2.reshape(len(x), -1)
        logits = flat @ self.params["w3"] + self.params["b3"]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        saved = {"x": x, "z1": z1, "cols1": cols1, "m1": m1, "p1": p1, "z2": z2,
                 "cols2": cols2, "m2": m2, "flat": flat}  # fmt: skip
        return probs, saved

    def gradients(
        self, probs: np.ndarray, y: np.ndarray, s: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        n = len(y)
        d = probs.copy()
        d[np.arange(n), y] -= 1
        d /= n
        g = {"w3": s["flat"].T @ d, "b3": d.sum(0)}
        dp2 = (d @ self.params["w3"].T).reshape(s["m2"].shape[0], 16, SIZE // 4, SIZE // 4)
        dz2 = _unpool(dp2, s["m2"]) * (s["z2"] > 0)
        flat2 = dz2.transpose(0, 2, 3, 1).reshape(-1, 16)
        g["w2"] = (flat2.T @ s["cols2"]).reshape(self.params["w2"].shape)
        g["b2"] = flat2.sum(0)
        dcols2 = flat2 @ self.params["w2"].reshape(16, -1)
        dp1 = _col2im(dcols2, s["p1"].shape)
        dz1 = _unpool(dp1, s["m1"]) * (s["z1"] > 0)
        flat1 = dz1.transpose(0, 2, 3, 1).reshape(-1, 8)
        g["w1"] = (flat1.T @ s["cols1"]).reshape(self.params["w1"].shape)
        g["b1"] = flat1.sum(0)
        return g

    def train(self, data: Digits, epochs: int, seed: int, lr: float = 0.004) -> None:
        """Adam on mini-batches of 64."""
        rng = np.random.default_rng(seed)
        m = {k: np.zeros_like(v) for k, v in self.params.items()}
        v = {k: np.zeros_like(p) for k, p in self.params.items()}
        step = 0
        for _ in range(epochs):
            order = rng.permutation(len(data.labels))
            for start in range(0, len(order), 64):
                batch = order[start : start + 64]
                probs, saved = self.forward(data.images[batch])
                grads = self.gradients(probs, data.labels[batch], saved)
                step += 1
                for k, grad in grads.items():
                    m[k] = 0.9 * m[k] + 0.1 * grad
                    v[k] = 0.999 * v[k] + 0.001 * grad * grad
                    m_hat, v_hat = m[k] / (1 - 0.9**step), v[k] / (1 - 0.999**step)
                    self.params[k] -= (lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)

    def accuracy(self, data: Digits) -> float:
        probs, _ = self.forward(data.images)
        return float((probs.argmax(1) == data.labels).mean())


def fold_scale(net: Network, factor: float) -> Network:
    """The same network expecting its input multiplied by ``factor`` (its first layer's
    weights divided by it): the silently wrong version's bug."""
    wrong = Network(0)
    wrong.params = {k: v.copy() for k, v in net.params.items()}
    wrong.params["w1"] = (wrong.params["w1"] / factor).astype(np.float32)
    return wrong


def export_onnx(net: Network, path: Path, doc: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = net.params
    nodes = [
        helper.make_node(
            "Conv", ["image", "w1", "b1"], ["z1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["z1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv", ["p1", "w2", "b2"], ["z2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["z2"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[
            numpy_helper.from_array(p[k], k) for k in ("w1", "b1", "w2", "b2", "w3", "b3")
        ],
    )
    model = helper.make_model(
        graph, producer_name="edgefleet-demo", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    model.doc_string = doc
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
