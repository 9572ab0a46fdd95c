"""``edgefleet hil``: run scenarios on a rig, register rigs with the server, and run the worker
that takes a rollout's HIL stage. Plugged into the ``edgefleet`` app through the
``edgefleet.cli`` entry point (the server's CLI does not import ``hil``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fleet_server.cli.context import ServerOpt, TokenOpt, api_client, console, err_console

if TYPE_CHECKING:
    from hil.rigfile import RigSpec
    from hil.runner import RunResult

# Every `edgefleet` start registers this group: the rig machinery (runner, reports, device
# kinds, the catalogue of profiles) is imported by the command that runs, not by the others.

__all__ = ["hil_app"]

hil_app = typer.Typer(no_args_is_help=True, help="hardware-in-the-loop rigs and scenarios")
rigs_app = typer.Typer(no_args_is_help=True, help="rigs registered with the server")
hil_app.add_typer(rigs_app, name="rigs")

RigOpt = Annotated[Path, typer.Option("--rig", help="the rig file (TOML)", exists=False)]


def _state_dir(rig: RigSpec, given: Path | None) -> Path:
    if given is not None:
        return given
    base = Path(os.environ.get("EDGEFLEET_DATA_DIR", Path.home() / ".edgefleet"))
    return base / "hil" / rig.name


def _broker_hook(rig: RigSpec) -> Callable[[], None] | None:
    command = rig.hooks.get("broker_restart")
    if command is None:
        return None

    def restart() -> None:
        from hil.rigfile import RigFileError

        done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RigFileError(
                rig.name, f"broker_restart hook {command!r} failed: {done.stderr.strip()}"
            )

    return restart


def _load_scenarios(path: Path | None) -> None:
    """A Python file whose top level registers scenarios (``hil.scenario.register``)."""
    if path is None:
        return
    from hil.rigfile import RigFileError

    spec = importlib.util.spec_from_file_location(f"hil_user_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise RigFileError(path.stem, f"--scenarios-from {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


@hil_app.command("run")
def run(
    rig_file: RigOpt,
    model: Annotated[str, typer.Option("--model", help="model name on the server")],
    version: Annotated[str, typer.Option("--version", help="the candidate version")],
    out: Annotated[Path, typer.Option("--out", help="where junit.xml and report.html go")],
    scenario: Annotated[
        list[str] | None,
        typer.Option("--scenario", help="a scenario by name (repeatable; default: all)"),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", help="the version it replaces (default: the one before)"),
    ] = None,
    scenarios_from: Annotated[
        Path | None, typer.Option("--scenarios-from", help="a Python file of your scenarios")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="the rig devices' state (default: ~/.edgefleet/hil/RIG)"),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="fail at once if another run holds the rig")
    ] = False,
    server: ServerOpt = "http://127.0.0.1:8600",
    token: TokenOpt = None,
) -> None:
    """Run scenarios on a rig against the server; exit 0 only if every one passed."""
    from hil.lease import RigBusy, RigLock
    from hil.report import write_reports
    from hil.rigfile import load_rig
    from hil.runner import HilRun

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rig = load_rig(rig_file)
    _load_scenarios(scenarios_from)
    api = api_client(server, token)
    lock = RigLock(rig.name, f"edgefleet hil run {model} {version}")
    try:
        lock.acquire(wait=not no_wait)
    except RigBusy as e:
        err_console.print(f"error: {e.message}")
        raise typer.Exit(1) from e
    try:
        result = HilRun(
            api,
            server,
            rig,
            model=model,
            version=version,
            baseline=baseline,
            scenarios=scenario or None,
            state_dir=_state_dir(rig, state_dir),
            restart_broker=_broker_hook(rig),
            work_dir=out / "work",
        ).run()
    finally:
        lock.release()
    paths = write_reports(result, out)
    if result.error is None:  # else every row would repeat the one reason
        _print(result)
    console.print(f"junit: {paths['junit']}\nreport: {paths['html']}")
    if result.error is not None:
        err_console.print(f"error: {result.error}")
        raise typer.Exit(2 if result.config_error else 1)
    raise typer.Exit(0 if result.passed else 1)


def _print(result: RunResult) -> None:
    table = Table(title=f"HIL {result.rig.name}: {result.model} {result.version}")
    for column in ("scenario", "device", "verdict", "why / evidence"):
        table.add_column(column)
    for s in result.scenarios:
        for c in s.cases:
            # A failure or a skip says why; a pass shows its last piece of evidence.
            detail = c.messages[0] if c.messages else (c.evidence[-1] if c.evidence else "")
            table.add_row(s.name, c.device, c.status, detail[:120])
    console.print(table)
    console.print("passed" if result.passed else "FAILED")


@hil_app.command("scenarios")
def scenarios() -> None:
    """The built-in scenarios and what each needs."""
    import hil.builtin  # noqa: F401 (registers them)
    from hil.scenario import SCENARIOS

    for s in SCENARIOS.values():
        needs = ", ".join(sorted(s.needs)) or "-"
        console.print(f"{s.name:16} {s.summary} (needs: {needs})")


@rigs_app.command("add")
def rigs_add(
    rig_file: Path, server: ServerOpt = "http://127.0.0.1:8600", token: TokenOpt = None
) -> None:
    """Register a rig (or replace its registration) so rollouts can name it."""
    from hil.rigfile import load_rig

    rig = load_rig(rig_file)
    api_client(server, token).post(
        "/v1/hil/rigs",
        json={
            "name": rig.name,
            "devices": [{"id": d.id, "profile": d.profile, "kind": d.kind} for d in rig.devices],
            "text": rig.text,
        },
    )
    console.print(f"registered rig {rig.name} ({len(rig.devices)} device(s))")


@rigs_app.command("list")
def rigs_list(server: ServerOpt = "http://127.0.0.1:8600", token: TokenOpt = None) -> None:
    table = Table()
    for column in ("rig", "devices", "registered"):
        table.add_column(column)
    for r in api_client(server, token).get("/v1/hil/rigs"):
        devices = ", ".join(f"{d['id']} ({d['kind']}, {d['profile']})" for d in r["devices"])
        table.add_row(r["name"], devices, r["registered_at"])
    console.print(table)


@hil_app.command("runner")
def runner(
    rig_file: RigOpt,
    once: Annotated[bool, typer.Option("--once", help="take at most one job, then exit")] = False,
    poll_s: Annotated[float, typer.Option("--poll-s", help="seconds between claims")] = 5.0,
    work_dir: Annotated[
        Path, typer.Option("--work-dir", help="where each job's reports are written")
    ] = Path("hil-jobs"),
    state_dir: Annotated[Path | None, typer.Option("--state-dir")] = None,
    server: ServerOpt = "http://127.0.0.1:8600",
    token: TokenOpt = None,
) -> None:
    """Take the server's HIL jobs for this rig, run them, post each verdict with its reports."""
    from hil.rigfile import load_rig
    from hil.worker import HilWorker

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rig = load_rig(rig_file)
    worker = HilWorker(
        api_client(server, token),
        server,
        rig,
        work_dir=work_dir,
        state_dir=_state_dir(rig, state_dir),
        restart_broker=_broker_hook(rig),
    )
    if once:
        job = worker.run_once()
        if job is None:
            console.print(f"no HIL job for rig {rig.name}")
            return
        console.print(
            f"job {job['id']}: {job['state']}"
            + (f" ({job['reason']})" if job.get("reason") else "")
        )
        raise typer.Exit(0 if job["state"] == "passed" else 1)
    worker.serve(poll_s)
