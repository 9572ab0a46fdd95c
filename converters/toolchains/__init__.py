"""Isolated, pinned converter toolchains.

onnx2tf pins numpy 1.26, protobuf 4 and tensorflow 2.19, which clash with the server's
libraries, so it lives in a virtualenv of its own (``edgefleet toolchain install tflite``) and
builds run it as a subprocess. The exact versions of what is installed there are recorded in
every bundle's manifest.

Toolchains live under ``$EDGEFLEET_TOOLCHAIN_DIR`` (default ``~/.cache/edgefleet/toolchains``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.contracts.errors import ConversionError


@dataclass(frozen=True)
class ToolchainSpec:
    name: str
    description: str
    #: pip requirement lines; onnx2tf pins its own dependencies exactly.
    requirements: tuple[str, ...]
    #: Distributions whose versions go into the manifest.
    report: tuple[str, ...]


TOOLCHAINS: dict[str, ToolchainSpec] = {
    "tflite": ToolchainSpec(
        name="tflite",
        description="ONNX → TFLite (fp32, int8) with onnx2tf and TensorFlow",
        requirements=("onnx2tf==1.29.24",),
        report=("onnx2tf", "tensorflow", "onnx", "onnxsim", "numpy", "ai-edge-litert"),
    ),
}


@dataclass(frozen=True)
class Toolchain:
    name: str
    root: Path
    versions: dict[str, str]

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def env(self) -> dict[str, str]:
        """Environment for its subprocesses: its bin first on PATH (onnx2tf runs ``onnxsim``
        through PATH), no GPU probing, quiet TensorFlow."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.root)
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        return env


def toolchain_dir() -> Path:
    configured = os.environ.get("EDGEFLEET_TOOLCHAIN_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "edgefleet" / "toolchains"


def _spec(name: str) -> ToolchainSpec:
    try:
        return TOOLCHAINS[name]
    except KeyError:
        raise ConversionError(
            f"unknown toolchain {name!r}; known: {sorted(TOOLCHAINS)}", reason="unknown_toolchain"
        ) from None


def locate(name: str) -> Toolchain:
    """The installed toolchain, or a ConversionError saying how to install it."""
    spec = _spec(name)
    root = toolchain_dir() / name
    marker = root / "edgefleet-toolchain.json"
    if not marker.is_file():
        raise ConversionError(
            f"the {name} toolchain is not installed ({spec.description}); "
            f"run: edgefleet toolchain install {name}",
            reason="toolchain_missing",
            toolchain=name,
        )
    info = json.loads(marker.read_text())
    return Toolchain(name=name, root=root, versions=dict(info["versions"]))


def install(name: str, *, log: Callable[[str], None] = print, force: bool = False) -> Toolchain:
    """Create the toolchain's virtualenv (in a temporary directory, renamed into place when
    complete, so a failed or interrupted install leaves nothing half-installed)."""
    spec = _spec(name)
    base = toolchain_dir()
    root = base / name
    if not force:
        try:
            found = locate(name)
            log(f"{name} toolchain already installed at {root}")
            return found
        except ConversionError:
            pass
    base.mkdir(parents=True, exist_ok=True)
    # The marker file is written last: a venv without it (a failed or interrupted install) is
    # not a toolchain, and the next install starts it over.
    shutil.rmtree(root, ignore_errors=True)
    try:
        log(f"creating virtualenv {root}")
        _run([sys.executable, "-m", "venv", str(root)], log)
        pip = [str(root / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        log(f"installing {' '.join(spec.requirements)} (several hundred MB; a few minutes)")
        _run([*pip, "install", "--quiet", *spec.requirements], log)
        versions = _versions(root / "bin" / "python", spec.report)
        marker = root / "edgefleet-toolchain.json"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"name": name, "requirements": spec.requirements, "versions": versions})
        )
        tmp.rename(marker)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    log(
        f"{name} toolchain installed at {root}: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    return Toolchain(name=name, root=root, versions=versions)


def _versions(python: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {'python': '.'.join(map(str, sys.version_info[:3]))}\n"
        f"for n in {list(names)!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(result.stdout)
    return versions


def _run(cmd: list[str], log: Callable[[str], None]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise ConversionError(
            f"{' '.join(cmd[:4])} … failed with exit code {result.returncode}: " + "\n".join(tail),
            reason="toolchain_install_failed",
        )
