"""A trained ResNet-like CNN for the converter benchmark (needs torch: the dev extra has it).

Parity of an int8 artifact is only meaningful on a model that has learned something: a random
network's logits sit close together, so tiny quantization errors flip its top-1 on many inputs,
which a trained classifier's confident logits do not. This module trains a ResNet-18-shaped
network (batch norm, ≈6.3 M parameters, ≈25 MB fp32) on a synthetic texture task, then exports
it at 224x224 with :func:`converters.torch_export.export` (batch norm folded into the convs).

The task: each class is a background colour plus two oriented sinusoidal gratings with their
own frequency and colour; a sample jitters the orientation, frequency, amplitude and phase and
adds pixel noise. Textures are defined in pixels, so a network trained on cheap 64x64 crops
(about two minutes on two cores) classifies 224x224 images of the same classes.

The exported model is cached under ``~/.cache/edgefleet/bench`` by its parameters, so later
benchmark runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Recipe:
    classes: int = 100
    widths: tuple[int, ...] = (48, 96, 192, 384)
    blocks: int = 2
    steps: int = 300
    batch: int = 64
    train_image: int = 64
    image: int = 224
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def texture_images(
    count: int, *, image: int, classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [count, 3, image, image] float32, labels [count])`` of the texture task."""
    spec = np.random.default_rng(7 + classes)
    theta = spec.uniform(0, np.pi, (classes, 2))
    freq = spec.uniform(0.04, 0.22, (classes, 2))  # cycles per pixel
    amp = spec.uniform(-1, 1, (classes, 2, 3))
    base = spec.uniform(-0.5, 0.5, (classes, 3))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    yy, xx = np.mgrid[0:image, 0:image].astype(np.float32)
    out = np.empty((count, 3, image, image), np.float32)
    for i, c in enumerate(labels):
        img = np.broadcast_to(base[c][:, None, None], (3, image, image)).copy()
        for k in range(2):
            th = theta[c, k] + rng.normal(0, 0.05)
            f = freq[c, k] * rng.uniform(0.93, 1.07)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * f * (xx * np.cos(th) + yy * np.sin(th)) + phase)
            img += amp[c, k][:, None, None] * rng.uniform(0.7, 1.3) * wave
        out[i] = img + rng.normal(0, 0.4, (3, image, image))
    return out, labels


def _network(recipe: Recipe) -> Any:
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.skip: nn.Module = nn.Identity()
            if (stride, cin) != (1, cout):
                self.skip = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            self.relu = nn.ReLU()

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.skip(x))

    w = recipe.widths
    layers: list[nn.Module] = [
        nn.Conv2d(3, w[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(w[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = w[0]
    for stage, cout in enumerate(w):
        for block in range(recipe.blocks):
            layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, recipe.classes)]
    return nn.Sequential(*layers)


def trained_cnn(path: Path, recipe: Recipe = Recipe(), *, log: Any = print) -> Path:
    """Train (or reuse from the cache) and export to ``path``; returns ``path``."""
    import shutil

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgefleet" / "bench"
    cached = cache / f"cnn-{recipe.key()}.onnx"
    if not cached.exists():
        _train_and_export(cached, recipe, log)
    shutil.copyfile(cached, path)
    return path


def _train_and_export(out: Path, recipe: Recipe, log: Any) -> None:
    import torch
    from torch import nn

    from converters.torch_export import export

    torch.manual_seed(recipe.seed)
    model = _network(recipe)
    params = sum(p.numel() for p in model.parameters())
    log(f"training the benchmark CNN ({params / 1e6:.1f} M parameters, {recipe.steps} steps)…")
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=recipe.steps)
    start = time.perf_counter()
    for step in range(recipe.steps):
        x, y = texture_images(
            recipe.batch,
            image=recipe.train_image,
            classes=recipe.classes,
            seed=recipe.seed * 1_000_003 + step,
        )
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s")
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    export(
        model,
        [torch.zeros(1, 3, recipe.image, recipe.image)],
        tmp,
        input_names=["x"],
        output_names=["logits"],
    )
    tmp.replace(out)
