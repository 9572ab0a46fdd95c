"""``edgefleet rollouts``: deploying model versions to devices."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet_server.builds.tables import BuildState
from fleet_server.cli.builds import follow_build, render_build
from fleet_server.cli.context import (
    DEFAULT_SERVER,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    console,
    parse_labels,
    print_json,
)
from fleet_server.client import ApiClient, ApiError

rollouts_app = typer.Typer(no_args_is_help=True, help="Deploy model versions to devices.")


def _render_rollout(r: dict[str, Any]) -> Table:
    table = Table(
        "device",
        "profile",
        "runtime",
        "state",
        "device state",
        "error",
        title=f"rollout {r['id']}: {r['model']} {r['version']} → slot {r['slot']} [{r['state']}]",
    )
    for t in r["targets"]:
        err = t.get("error") or {}
        table.add_row(
            t["device_id"],
            t["profile"],
            f"{t['runtime']}/{t['precision']}",
            t["state"],
            t.get("device_state") or "-",
            err.get("message", ""),
        )
    return table


@rollouts_app.command("create")
def rollouts_create(
    model: Annotated[str, typer.Option(help="model name")],
    version: Annotated[str, typer.Option(help="model version")],
    device: Annotated[list[str] | None, typer.Option(help="target device id (repeatable)")] = None,
    selector: Annotated[list[str] | None, typer.Option(help="label key=value (repeatable)")] = None,
    slot: Annotated[
        str | None, typer.Option(help="slot on the device (default: model name)")
    ] = None,
    shadow_of: Annotated[
        str | None, typer.Option(help="run as a shadow beside this active slot (never answers)")
    ] = None,
    sample_rate: Annotated[float, typer.Option(help="shadow: share of requests it sees")] = 0.1,
    wait: Annotated[bool, typer.Option(help="wait until every target serves or fails")] = True,
    timeout_s: Annotated[float, typer.Option(help="how long --wait waits")] = 300.0,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a model version to devices (by id or label selector)."""
    client = api_client(server, token)
    body = {
        "model": model,
        "version": version,
        "devices": device or None,
        "selector": parse_labels(selector) or None,
        "slot": slot,
        "shadow_of": shadow_of,
        "sample_rate": sample_rate,
    }
    rollout = _create_rollout(client, body, quiet=as_json)
    if wait:
        from rich.live import Live

        deadline = time.monotonic() + timeout_s
        with Live(_render_rollout(rollout), console=console, transient=as_json) as live:
            while rollout["state"] == "in_progress" and time.monotonic() < deadline:
                time.sleep(0.5)
                rollout = client.get(f"/v1/rollouts/{rollout['id']}")
                live.update(_render_rollout(rollout))
    elif not as_json:
        console.print(_render_rollout(rollout))
    if as_json:
        print_json(rollout)
    if wait and rollout["state"] != "completed":
        raise typer.Exit(1)


def _create_rollout(client: ApiClient, body: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """POST the rollout without letting the server wait on builds: when bundles are missing,
    follow their builds here (log and spinner), then post again."""
    while True:
        try:
            rollout: dict[str, Any] = client.post(
                "/v1/rollouts", json=body, params={"build_wait_s": 0}
            )
            return rollout
        except ApiError as e:
            if e.reason != "build_pending":
                raise
            build_ids = (e.fields.get("detail") or {}).get("build_ids") or []
            if not build_ids:
                raise
        for build_id in build_ids:
            if not quiet:
                console.print(f"building the bundle for this rollout: build {build_id}")
            build = follow_build(client, client.get(f"/v1/builds/{build_id}"), quiet)
            if build["state"] == BuildState.FAILED:
                console.print(render_build(build))
                raise typer.Exit(1)


@rollouts_app.command("status")
def rollouts_status(
    rollout_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-device progress of a rollout."""
    rollout = api_client(server, token).get(f"/v1/rollouts/{rollout_id}")
    if as_json:
        print_json(rollout)
    else:
        console.print(_render_rollout(rollout))


@rollouts_app.command("list")
def rollouts_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """All rollouts, newest first."""
    rollouts = api_client(server, token).get("/v1/rollouts")
    if as_json:
        print_json(rollouts)
        return
    table = Table("id", "model", "version", "slot", "state", "serving/total", "created")
    for r in rollouts:
        table.add_row(
            r["id"],
            r["model"],
            r["version"],
            r["slot"],
            r["state"],
            f"{r['counts']['serving']}/{len(r['targets'])}",
            r["created_at"][:19],
        )
    console.print(table)
