"""The agent stays light: importing and starting it pulls neither the server nor the
converters nor their libraries, and the ``agent`` extra does not name them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = {
    "fastapi",
    "sqlmodel",
    "sqlalchemy",
    "uvicorn",
    "onnx",
    "typer",
    "rich",
    "httpx",
    "psycopg",
    "iotcore",
    "python-multipart",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
}


def test_agent_extra_names_no_server_or_converter_library() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        for d in project["dependencies"] + project["optional-dependencies"]["agent"]
    }
    assert not names & SERVER_ONLY
    assert {"paho-mqtt", "onnxruntime", "numpy"} <= names


def _loaded(statement: str, packages: set[str], modules: frozenset[str] = frozenset()) -> str:
    """Which of ``packages`` (top-level names) and ``modules`` a fresh interpreter has
    imported after running ``statement``."""
    code = (
        f"import sys; {statement}; packages, modules = {sorted(packages)!r}, {sorted(modules)!r};"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "packages} | (set(modules) & set(sys.modules)))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_agent_imports_none_of_the_server_stack() -> None:
    statement = "import edge_agent.agent, edge_agent.cli, edge_agent.serving.client"
    # pydantic among them: on a device it cost ~15 MiB resident (issue 24).
    server = {"fleet_server", "converters", "fastapi", "sqlmodel", "sqlalchemy", "onnx",
              "uvicorn", "typer", "httpx", "rich", "pydantic", "pydantic_core"}  # fmt: skip
    assert _loaded(statement, server) == ""
    # Nor what only some configurations or commands use: streams, batch scoring.
    optional = frozenset({"edge_agent.serving.stream", "edge_agent.scoring"})
    assert _loaded("import edge_agent.agent", set(), optional) == ""


@pytest.mark.slow
def test_pip_resolves_the_agent_extra_without_server_packages(tmp_path: Path) -> None:
    """Ask pip what ``pip install .[agent]`` would install (dry run, real resolver)."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            f"{ROOT}[agent]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.fail(f"pip could not resolve the agent extra: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    installed = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"paho-mqtt", "onnxruntime"} <= installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY


def test_package_data_ships_every_dashboard_file() -> None:
    """The dashboard's templates and vendored scripts are not Python: a wheel holds them only
    if package-data names them."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["fleet_server.ui"]
    ui = ROOT / "fleet_server" / "ui"
    shipped = {p for pattern in patterns for p in ui.glob(pattern) if p.is_file()}
    present = {p for d in ("templates", "static") for p in (ui / d).iterdir() if p.is_file()}
    assert present and present == shipped, sorted(str(p) for p in present ^ shipped)


def test_the_cli_starts_without_the_server_stack() -> None:
    """Every `edgefleet` command is a fresh process: the ones that only talk to the REST API
    (most of them) must not pay for the database layer, the web framework, the HIL machinery
    or the profiles' schema. A command imports what it uses when it runs."""
    heavy = {"sqlalchemy", "sqlmodel", "fastapi", "uvicorn", "onnx", "onnxruntime", "numpy",
             "cryptography", "markdown_it"}  # fmt: skip
    machinery = frozenset({"hil.runner", "hil.report", "firmware_profiles.schema"})
    assert _loaded("from fleet_server.cli.main import app", heavy, machinery) == ""


def test_runtime_versions_are_read_without_importlib_metadata() -> None:
    """The agent asks which runtimes are installed at every start. ``importlib.metadata``
    would stay resident for good (~0.9 MiB, issue 24); the versions are the ones it gives."""
    import json
    from importlib.metadata import version

    code = (
        "import json, sys; from edge_agent.runtimes import available_runtimes; "
        "print(json.dumps([available_runtimes(), 'importlib.metadata' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found, loaded = json.loads(out.stdout)
    assert found["onnxruntime"] == version("onnxruntime")
    if "litert" in found:
        assert found["litert"] == version("ai-edge-litert")
    assert "tensorrt" not in found
    assert not loaded


def test_installed_version_reads_the_dist_info_name_first_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.runtimes.base import installed_version

    first, second = tmp_path / "a", tmp_path / "b"
    (first / "Some_Runtime-2.0.1.dist-info").mkdir(parents=True)
    (second / "some.runtime-1.0.0.dist-info").mkdir(parents=True)
    (second / "other_gpu-3.1.dist-info").mkdir()
    (second / "some_runtime-9.9.9.data").mkdir()  # not a dist-info: never read
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(first), str(second)])
    # "json" stands for the library the distributions install: it can be imported.
    assert installed_version("json", "some-runtime") == "2.0.1"  # where an import finds it
    assert installed_version("json", "other", "other-gpu") == "3.1"
    assert installed_version("json", "nothing-like-it") is None  # importlib.metadata agrees
    assert installed_version("no_such_library_here", "some-runtime") is None
