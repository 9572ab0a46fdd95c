"""``edgefleet devices``: enrollment tokens and the enrolled fleet."""

from __future__ import annotations

import csv
import os
from pathlib import Path
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
    err_console,
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


@devices_app.command("tokens")
def devices_tokens(
    count: Annotated[int, typer.Option(help="how many tokens (1..10000)")],
    out: Annotated[Path, typer.Option(help="CSV file to write (not overwritten)")],
    profile: Annotated[
        str | None, typer.Option(help="only devices of this profile may use them")
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value given to each device")] = None,
    ttl_s: Annotated[int | None, typer.Option(help="validity in seconds")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """One-time enrollment tokens for a batch of devices, in one request, written to a CSV
    file only you can read: `token,expires_at,profile,labels` (provisioning reads a line each).
    """
    if out.exists():
        raise typer.BadParameter(f"{out} exists; choose another file", param_hint="--out")
    body = {"count": count, "profile": profile, "labels": parse_labels(label), "ttl_s": ttl_s}
    result = api_client(server, token).post("/v1/enrollment-tokens/batch", json=body)
    labels = ",".join(f"{k}={v}" for k, v in sorted(result["labels"].items()))
    # Created readable by its owner alone, before any secret is written into it.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["token", "expires_at", "profile", "labels"])
        for value in result["tokens"]:
            writer.writerow([value, result["expires_at"], result["profile"] or "", labels])
    console.print(
        f"wrote {len(result['tokens'])} enrollment token(s) to {out} "
        f"(single use; they expire {result['expires_at']})"
    )


@devices_app.command("label")
def devices_label(
    device_id: Annotated[str, typer.Argument(help="device id")],
    changes: Annotated[
        list[str], typer.Argument(help="key=value to set, key- to remove (like kubectl label)")
    ],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set and remove a device's labels: `edgefleet devices label cam-01 site=paris tier-`."""
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for change in changes:
        if change.endswith("-") and "=" not in change:
            remove.append(change[:-1])
            continue
        key, sep, value = change.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value or key-, got {change!r}")
        set_labels[key] = value
    device = api_client(server, token).request(
        "PATCH", f"/v1/devices/{device_id}/labels", json={"set": set_labels, "remove": remove}
    )
    if as_json:
        print_json(device)
        return
    labels = ",".join(f"{k}={v}" for k, v in sorted(device["labels"].items())) or "(none)"
    console.print(f"{device_id}: {labels}")


@devices_app.command("list")
def devices_list(
    selector: Annotated[
        str | None,
        typer.Option(help="labels and profile: 'hw=rpi4,site in (berlin,paris),!exempt'"),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List enrolled devices with what they report."""
    params = {"selector": selector} if selector else {}
    devices = api_client(server, token).get("/v1/devices", params=params)
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
            "decommissioned" if d.get("decommissioned_at") else "yes" if d["online"] else "no",
            ",".join(f"{k}={v}" for k, v in d["labels"].items()),
            shown or "-",
            f"{d['desired_seq']}/{d['reported_seq']}",
        )
    console.print(table)


@devices_app.command("show")
def devices_show(
    device_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one device: what it runs, slot by slot (--json: the full reported state)."""
    device = api_client(server, token).get(f"/v1/devices/{device_id}")
    if as_json:
        print_json(device)
        return
    reported = device.get("reported") or {}
    console.print(
        f"{device['id']} ({device['profile']}), "
        + (
            f"decommissioned at {device['decommissioned_at']}"
            if device.get("decommissioned_at")
            else "online"
            if device["online"]
            else "offline"
        )
        + ", "
        f"agent {device.get('agent_version') or '?'}, labels {device['labels']}, "
        f"seq {device['desired_seq']}/{device['reported_seq']}"
        + (
            f", certificate until {device['certificate_expires_at']}"
            if device.get("certificate_expires_at")
            else ""
        ),
        highlight=False,
    )
    table = Table("slot", "state", "serving", "target", "error")
    for name, slot in (reported.get("slots") or {}).items():
        active = slot.get("active") or {}
        error = slot.get("error") or {}
        table.add_row(
            name,
            slot.get("state", ""),
            f"{active.get('model', '')} {active.get('version', '')}".strip(),
            (slot.get("target_sha256") or "")[:12],
            f"{error.get('reason', '')}: {error.get('message', '')}" if error else "",
        )
    console.print(table)
    if reported.get("refusal"):
        refusal = reported["refusal"]
        console.print(f"last refusal: {refusal['reason']}: {refusal['message']}", highlight=False)


@devices_app.command("decommission")
def devices_decommission(
    device_id: str,
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take a device out of service for good (lost, sold, retired): its credential and client
    certificates are revoked at the server and the broker, its retained messages cleared, and
    it leaves every cohort; its history stays. Enrolling it again takes a new token. Exits 1
    when the broker still needs a hand (a reload that failed or is not configured)."""
    if not yes and not typer.confirm(
        f"decommission {device_id}? it will not reach the fleet again until enrolled anew"
    ):
        raise typer.Abort()
    done = api_client(server, token).post(
        f"/v1/devices/{device_id}/decommission", json={"reason": reason}
    )
    if as_json:
        print_json(done)
    else:
        reloaded = {True: "reloaded", False: "NOT reloaded", None: "no reload command"}
        console.print(
            f"{done['device_id']} decommissioned at {done['decommissioned_at']}: "
            f"{done['certificates_revoked']} certificate(s) revoked, broker files "
            f"{', '.join(done['broker_files']) or 'unchanged'} "
            f"({reloaded[done['broker_reloaded']]}), retained messages "
            f"{'cleared' if done['retained_cleared'] else 'NOT cleared'}"
        )
    if done["warnings"]:
        err_console.print(
            f"error: {done['device_id']} is decommissioned, but " + "; ".join(done["warnings"])
        )
        raise typer.Exit(1)
