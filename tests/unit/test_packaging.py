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
