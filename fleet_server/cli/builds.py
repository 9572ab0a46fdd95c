"""``edgefleet builds``: compiling model versions for device profiles."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet_server.builds.states import BuildState
from fleet_server.cli.context import (
    DEFAULT_SERVER,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    console,
    err_console,
    parse_labels,
    print_json,
)
from fleet_server.client import ApiClient

builds_app = typer.Typer(no_args_is_help=True, help="Compile model versions for device profiles.")


def render_build(b: dict[str, Any]) -> Table:
    table = Table(
        title=f"build {b['id']}: {b['model']} {b['version']} for {b['profile']} — {b['state']}"
    )
    for column in ("candidate", "outcome", "max abs", "rel L2", "top-1", "size", "latency", "why"):
        table.add_column(column)
    for c in b["candidates"]:
        p = c.get("parity") or {}
        top1 = p.get("top1_agreement")
        table.add_row(
            f"{c['runtime']}/{c['precision']}",
            c["outcome"],
            _figure(p.get("max_abs_error")),
            _figure(p.get("rel_l2_error")),
            f"{top1:.3f}" if isinstance(top1, float) else "",
            f"{p['size_bytes'] / 1e6:.2f} MB" if p else "",
            f"{p['latency_ms_median']:.2f} ms" if p else "",
            c.get("error") or "; ".join(p.get("failed", [])),
        )
    return table


def follow_build(client: ApiClient, build: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Stream the build's log until it finishes, with a spinner showing its state."""
    offset = 0
    with console.status(f"build {build['id']}: {build['state']}…") as status:
        while True:
            chunk = client.get(f"/v1/builds/{build['id']}/log", params={"offset": offset})
            offset = chunk["next_offset"]
            if chunk["text"] and not quiet:
                for line in chunk["text"].rstrip("\n").splitlines():
                    console.print(f"  {line}", style="dim", highlight=False)
            status.update(f"build {build['id']}: {chunk['state']}…")
            if chunk["state"] in (BuildState.SUCCEEDED, BuildState.FAILED):
                break
            time.sleep(0.5)
    result: dict[str, Any] = client.get(f"/v1/builds/{build['id']}")
    return result


@builds_app.command("create")
def builds_create(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="model version")],
    profile: Annotated[str, typer.Option(help="device profile, e.g. raspberry-pi-4")],
    threshold: Annotated[
        list[str] | None,
        typer.Option(help="parity threshold override NAME=VALUE (VALUE 'off' disables it)"),
    ] = None,
    runtime: Annotated[list[str] | None, typer.Option(help="only this runtime")] = None,
    precision: Annotated[list[str] | None, typer.Option(help="only this precision")] = None,
    fp32_input: Annotated[
        list[str] | None,
        typer.Option(
            help="an input that is state or configuration: kept in fp32, not calibrated "
            "(repeatable; default: scalars, integer inputs, inputs not led by the batch axis)"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the log until the build ends")] = True,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile a model version for a profile: converts, runs the parity gate, signs a bundle.
    Exits 1 when the build fails."""
    thresholds: dict[str, float | None] = {}
    for name, value in parse_labels(threshold).items():
        try:
            thresholds[name] = None if value == "off" else float(value)
        except ValueError:
            raise typer.BadParameter(f"threshold {name}: {value!r} is not a number") from None
    client = api_client(server, token)
    body = {
        "model": model,
        "version": version,
        "profile": profile,
        "thresholds": thresholds,
        "runtimes": runtime,
        "precisions": precision,
        "fp32_inputs": fp32_input,
    }
    build = client.post("/v1/builds", json=body)
    if wait and build["state"] in (BuildState.QUEUED, BuildState.RUNNING):
        build = follow_build(client, build, quiet=as_json)
    if as_json:
        print_json(build)
    else:
        console.print(render_build(build))
        if build["state"] == BuildState.SUCCEEDED:
            console.print(
                f"bundle {build['bundle_sha256'][:12]}: {build['runtime']}/{build['precision']}"
                + (f", {build['seconds']:.1f} s" if build.get("seconds") else "")
                + (f", peak RSS {build['peak_rss_mb']:.0f} MB" if build.get("peak_rss_mb") else "")
            )
        elif build["state"] == BuildState.FAILED:
            err_console.print(f"error: {(build['error'] or {}).get('message', 'build failed')}")
    if build["state"] == BuildState.FAILED:
        raise typer.Exit(1)


@builds_app.command("list")
def builds_list(
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recent builds."""
    params = {"model": model} if model else {}
    builds = api_client(server, token).get("/v1/builds", params=params)
    if as_json:
        print_json(builds)
        return
    table = Table(title="builds")
    for column in ("id", "model", "version", "profile", "state", "artifact", "seconds"):
        table.add_column(column)
    for b in builds:
        artifact = f"{b['runtime']}/{b['precision']}" if b["runtime"] else ""
        seconds = f"{b['seconds']:.1f}" if b.get("seconds") else ""
        table.add_row(
            b["id"], b["model"], b["version"], b["profile"], b["state"], artifact, seconds
        )
    console.print(table)


@builds_app.command("show")
def builds_show(
    build_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A build's state and every candidate's parity report."""
    build = api_client(server, token).get(f"/v1/builds/{build_id}")
    if as_json:
        print_json(build)
        return
    console.print(render_build(build))
    if build["error"]:
        console.print(f"error: {build['error']['message']}")


@builds_app.command("logs")
def builds_logs(
    build_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="until the build ends")] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a build's log (--json: the log with the build's state and next offset)."""
    client = api_client(server, token)
    if as_json:
        print_json(client.get(f"/v1/builds/{build_id}/log"))
        return
    if follow:
        follow_build(client, client.get(f"/v1/builds/{build_id}"), quiet=False)
        return
    print(client.get(f"/v1/builds/{build_id}/log")["text"], end="")


def _figure(value: Any) -> str:
    """A parity figure; blank when the build did not judge by it (e.g. top-1 outputs)."""
    return f"{value:.3g}" if isinstance(value, float) else ""
