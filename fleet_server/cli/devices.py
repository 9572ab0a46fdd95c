"""``edgefleet devices``: enrollment tokens and the enrolled fleet."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

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

devices_app = typer.Typer(no_args_is_help=True, help="Devices and enrollment.")


@devices_app.command("token")
def devices_token(
    profile: Annotated[
        str | None, typer.Option(help="only devices of this profile may use it")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value given to the device")] = None,
    ttl_s: Annotated[int | None, typer.Option(help="validity in seconds")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time enrollment token for `edge-agent enroll`."""
    body = {"profile": profile, "labels": parse_labels(label), "ttl_s": ttl_s}
    result = api_client(server, token).post("/v1/enrollment-tokens", json=body)
    if as_json:
        print_json(result)
    else:
        print(result["token"])


@devices_app.command("list")
def devices_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List enrolled devices with what they report."""
    devices = api_client(server, token).get("/v1/devices")
    if as_json:
        print_json(devices)
        return
    table = Table("device", "profile", "online", "labels", "slots", "seq (desired/reported)")
    for d in devices:
        slots = (d.get("reported") or {}).get("slots") or {}
        shown = ", ".join(
            f"{s}={(v.get('active') or {}).get('version', '-')} [{v['state']}]"
            for s, v in slots.items()
        )
        table.add_row(
            d["id"],
            d["profile"],
            "yes" if d["online"] else "no",
            ",".join(f"{k}={v}" for k, v in d["labels"].items()),
            shown or "-",
            f"{d['desired_seq']}/{d['reported_seq']}",
        )
    console.print(table)


@devices_app.command("show")
def devices_show(
    device_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None
) -> None:
    """Show one device, with its full reported state (JSON)."""
    print_json(api_client(server, token).get(f"/v1/devices/{device_id}"))
