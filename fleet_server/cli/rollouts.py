"""``edgefleet rollouts``: deploying model versions to devices."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from fleet_server.builds.states import BuildState
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


#: Rollout states that end it (the CLI stops following there).
FINISHED = {"completed", "failed", "aborted", "superseded"}
#: States in which ``create --wait`` stops: over, or waiting for the operator.
SETTLED = FINISHED | {"awaiting_approval", "paused"}
#: Devices listed in the live view; the rest are counted.
SHOWN_DEVICES = 25


def _render_rollout(r: dict[str, Any], *, all_devices: bool = False) -> Group:
    """The rollout as a person follows it: stages, gates, the latest events, devices."""
    title = (
        f"rollout {r['id']}: {r['model']} {r['version']} → slot {r['slot']} "
        f"[{r['state']}] {r.get('strategy', 'all_at_once')}"
    )
    parts: list[Any] = []
    columns = ("targeted", "notified", "downloading", "staged", "probation", "active",
               "failed", "rolled back", "timed out")  # fmt: skip
    stages = Table("stage", "share", "state", *columns, title=title)
    for st in r.get("stages", []):
        c = st["counts"]
        stages.add_row(
            str(st["index"] + 1), f"{st['percent']:g} %", st["state"],
            *(str(c.get(k, 0)) for k in ("targeted", "notified", "downloading", "staged",
                                         "probation", "serving", "failed", "rolled_back",
                                         "timed_out")),
        )  # fmt: skip
    if r.get("hil"):
        h = r["hil"]
        hil = Table("HIL rig", "state", "runner", "deadline", "report", title="stage 0: HIL")
        report = h.get("report_url") or "-"
        hil.add_row(h["rig"], h["state"], h.get("claimed_by") or "-", h["deadline_at"][11:19],
                    report)  # fmt: skip
        parts.append(hil)
    parts.append(stages)
    if r.get("gates"):
        gates = Table("gate", "figure", "threshold", "verdict", "detail")
        shown_data = []
        for g in r["gates"]:
            verdict = {True: "ok", False: "BREACH", None: "no evidence yet"}[g["ok"]]
            if not g.get("applies", True):
                verdict = "n/a"
            value = "-" if g["value"] is None else f"{g['value']:g}"
            gates.add_row(g["gate"], value, f"{g['threshold']:g}", verdict, g.get("detail", ""))
            if g.get("data") and g["data"].get("previous"):
                shown_data.append(g["data"])
        parts.append(gates)
        for d in shown_data:
            bins = d.get("labels") or [str(i) for i in range(len(d["previous"]))]
            shift = Table("", *bins,
                          title=f"prediction shift: {d['output']} ({d['kind']}"
                                f"{'' if d['kind'] == 'top1' else ', group ' + str(d['group'])})"
                                f" on {d['profile']}")  # fmt: skip
            shift.add_row(f"previous {d.get('previous_version') or ''}",
                          *(f"{p:.3f}" for p in d["previous"]))  # fmt: skip
            shift.add_row("candidate", *(f"{p:.3f}" for p in d["candidate"]))
            parts.append(shift)
    if r.get("awaiting") == "evidence":
        note = "awaiting approval: a gate lacked evidence (promote accepts, abort rolls back)"
        parts.append(Text(note, style="yellow"))
    if r.get("reason"):
        parts.append(Text(f"reason: {r['reason']}", style="red"))
    events = Table("at", "event", "by", "message", title="latest events")
    for e in r.get("events", [])[-6:]:
        events.add_row(e["at"][11:19], e["kind"], e["actor"], e["message"])
    parts.append(events)
    targets = r.get("targets", [])
    if targets:
        shown = targets if all_devices else targets[:SHOWN_DEVICES]
        devices = Table("device", "profile", "stage", "runtime", "state", "device state", "error")
        for t in shown:
            err = t.get("error") or {}
            devices.add_row(
                t["device_id"], t["profile"], str(t.get("stage", 0) + 1),
                f"{t['runtime']}/{t['precision']}" if t.get("runtime") else "-",
                t["state"], t.get("device_state") or "-",
                err.get("message", "") or (t.get("note") or ""),
            )  # fmt: skip
        parts.append(devices)
        if len(shown) < len(targets):
            parts.append(Text(f"… and {len(targets) - len(shown)} more devices (--all)"))
    return Group(*parts)


def _split_stages(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"stages are percentages like 1,10,50,100, not {text!r}") from None


def _gates(pairs: list[str] | None) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for name, value in parse_labels(pairs).items():
        try:
            out[name] = (
                None
                if value in ("off", "none")
                else (
                    int(value)
                    if name in ("min_devices_reporting", "min_requests", "min_labels")
                    else float(value)
                )
            )
        except ValueError:
            raise typer.BadParameter(f"gate {name}: {value!r} is not a number") from None
    return out


@rollouts_app.command("create")
def rollouts_create(
    model: Annotated[str, typer.Option(help="model name")],
    version: Annotated[str, typer.Option(help="model version")],
    device: Annotated[list[str] | None, typer.Option(help="target device id (repeatable)")] = None,
    selector: Annotated[
        list[str] | None,
        typer.Option(help="cohort: 'hw=rpi4,site in (berlin,paris),!exempt' (repeats are and-ed)"),
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="all_at_once, canary, shadow, stage_then_activate or ab")
    ] = "all_at_once",
    stages: Annotated[
        str | None, typer.Option(help="canary stages in percent, e.g. 1,10,50,100")
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option(help="gate=threshold (repeatable), e.g. max_error_rate=0.01, max_psi=off"),
    ] = None,
    bake_s: Annotated[float, typer.Option(help="how long each stage serves before its gates")] = 0,
    stage_timeout_s: Annotated[
        float, typer.Option(help="a device silent this long after notification is timed out")
    ] = 1800,
    max_per_minute: Annotated[
        int | None, typer.Option(help="notify at most this many devices a minute")
    ] = None,
    ramp: Annotated[
        str | None,
        typer.Option(
            help="exponential rate: BASE,FACTOR,AFTER (e.g. 10,2,20: x2 per 20 that serve)"
        ),
    ] = None,
    manual_approval: Annotated[
        bool, typer.Option(help="wait for `rollouts promote` after each stage")
    ] = False,
    split_pct: Annotated[
        float | None, typer.Option(help="ab: the share of the cohort on the candidate")
    ] = None,
    min_confidence: Annotated[
        float, typer.Option(help="ab: how sure the verdict must be to promote the candidate")
    ] = 0.95,
    supersedes: Annotated[
        str | None, typer.Option(help="the active rollout on this slot this one replaces")
    ] = None,
    slot: Annotated[
        str | None, typer.Option(help="slot on the device (default: model name)")
    ] = None,
    shadow_of: Annotated[
        str | None, typer.Option(help="run as a shadow beside this active slot (never answers)")
    ] = None,
    sample_rate: Annotated[float, typer.Option(help="shadow: share of requests it sees")] = 0.1,
    max_bake_s: Annotated[
        float,
        typer.Option(help="after the bake, how long a stage waits for its gates' evidence"),
    ] = 3600,
    on_no_evidence: Annotated[
        str, typer.Option(help="no evidence within --max-bake-s: 'approval' or 'abort'")
    ] = "approval",
    allow_breaking: Annotated[
        bool,
        typer.Option(help="deploy even if inputs/outputs differ from what the slot serves"),
    ] = False,
    hil_rig: Annotated[
        str | None,
        typer.Option(help="stage 0 is a HIL run on this registered rig (`edgefleet hil rigs add`)"),
    ] = None,
    hil_scenario: Annotated[
        list[str] | None, typer.Option(help="HIL scenario (repeatable; default: all the rig can)")
    ] = None,
    hil_timeout_s: Annotated[
        float, typer.Option(help="no HIL verdict within this long fails the stage")
    ] = 1800,
    wait: Annotated[
        bool, typer.Option(help="follow it until it ends, or waits for approval")
    ] = True,
    timeout_s: Annotated[float, typer.Option(help="how long --wait waits")] = 300.0,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a model version to a cohort (device ids or a selector), in stages, with gates."""
    cohort = ",".join(selector) if selector else None
    if cohort is not None:
        from fleet_server.devices.selectors import Selector  # the server's own parser
        from fleet_server.errors import InvalidInputError

        try:
            Selector.parse(cohort)
        except InvalidInputError as e:
            raise typer.BadParameter(e.message, param_hint="--selector") from None
    client = api_client(server, token)
    rate: dict[str, Any] = {"max_per_minute": max_per_minute}
    if ramp is not None:
        try:
            base, factor, after = ramp.split(",")
            rate["ramp"] = {"base_per_minute": int(base), "increase_factor": float(factor),
                            "after_succeeded": int(after)}  # fmt: skip
        except ValueError:
            raise typer.BadParameter(f"--ramp is BASE,FACTOR,AFTER, not {ramp!r}") from None
    body: dict[str, Any] = {
        "model": model,
        "version": version,
        "devices": device or None,
        "selector": cohort,
        "slot": slot,
        "shadow_of": shadow_of,
        "sample_rate": sample_rate,
        "strategy": strategy,
        "stages": _split_stages(stages),
        "gates": _gates(gate),
        "bake_s": bake_s,
        "stage_timeout_s": stage_timeout_s,
        "rate": rate,
        "manual_approval": manual_approval,
        "supersedes": supersedes,
        "split_pct": split_pct,
        "min_confidence": min_confidence,
        "max_bake_s": max_bake_s,
        "on_no_evidence": on_no_evidence,
        "allow_breaking": allow_breaking,
    }
    if hil_rig is not None:
        body["hil"] = {"rig": hil_rig, "scenarios": hil_scenario or None,
                       "timeout_s": hil_timeout_s}  # fmt: skip
    elif hil_scenario:
        raise typer.BadParameter("--hil-scenario needs --hil-rig", param_hint="--hil-scenario")
    rollout = _create_rollout(client, {k: v for k, v in body.items() if v is not None}, as_json)
    if wait:
        rollout = _follow(client, rollout, timeout_s, SETTLED, quiet=as_json)
    elif not as_json:
        console.print(_render_rollout(rollout))
    if as_json:
        print_json(rollout)
    if wait and rollout["state"] not in ("completed", "awaiting_approval"):
        raise typer.Exit(1)


def _follow(
    client: ApiClient,
    rollout: dict[str, Any],
    timeout_s: float,
    until: set[str],
    *,
    quiet: bool = False,
    all_devices: bool = False,
) -> dict[str, Any]:
    from rich.live import Live

    deadline = time.monotonic() + timeout_s
    with Live(_render_rollout(rollout, all_devices=all_devices), console=console,
              transient=quiet) as live:  # fmt: skip
        while rollout["state"] not in until and time.monotonic() < deadline:
            time.sleep(0.5)
            rollout = client.get(f"/v1/rollouts/{rollout['id']}")
            live.update(_render_rollout(rollout, all_devices=all_devices))
    return rollout


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
    watch: Annotated[bool, typer.Option("--watch", help="a live view until it ends")] = False,
    all_devices: Annotated[bool, typer.Option("--all", help="list every device")] = False,
    timeout_s: Annotated[float, typer.Option(help="how long --watch watches")] = 3600.0,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per stage and per device progress, each gate against its threshold, the latest events."""
    client = api_client(server, token)
    rollout = client.get(f"/v1/rollouts/{rollout_id}")
    if watch and not as_json:
        _follow(client, rollout, timeout_s, FINISHED, all_devices=all_devices)
        return
    if as_json:
        print_json(rollout)
    else:
        console.print(_render_rollout(rollout, all_devices=all_devices))


@rollouts_app.command("list")
def rollouts_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """All rollouts, newest first."""
    rollouts = api_client(server, token).get("/v1/rollouts", params={"targets": "false"})
    if as_json:
        print_json(rollouts)
        return
    table = Table("id", "model", "version", "slot", "strategy", "stage", "state",
                  "serving/targeted", "created")  # fmt: skip
    for r in rollouts:
        targeted = sum(v for k, v in r["counts"].items() if k not in ("released", "excluded"))
        table.add_row(
            r["id"],
            r["model"],
            r["version"],
            r["slot"],
            r["strategy"],
            f"{r['stage'] + 1}/{len(r['stages'])}",
            r["state"],
            f"{r['counts']['serving']}/{targeted}",
            r["created_at"][:19],
        )
    console.print(table)


def _command(verb: str, rollout_id: str, server: str, token: str | None, as_json: bool,
             body: dict[str, Any] | None = None) -> None:  # fmt: skip
    rollout = api_client(server, token).post(f"/v1/rollouts/{rollout_id}/{verb}", json=body)
    if as_json:
        print_json(rollout)
    else:
        console.print(f"rollout {rollout['id']}: {rollout['state']} (stage {rollout['stage'] + 1})")


@rollouts_app.command("pause")
def rollouts_pause(
    rollout_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Notify no more devices; those already notified carry on."""
    _command("pause", rollout_id, server, token, as_json)


@rollouts_app.command("resume")
def rollouts_resume(
    rollout_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Carry on after a pause."""
    _command("resume", rollout_id, server, token, as_json)


@rollouts_app.command("abort")
def rollouts_abort(
    rollout_id: str,
    reason: Annotated[str | None, typer.Option(help="why (kept in the history)")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop the rollout and give every device it touched its previous version back."""
    _command("abort", rollout_id, server, token, as_json, {"reason": reason} if reason else None)


@rollouts_app.command("promote")
def rollouts_promote(
    rollout_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Start the next stage (approve a stage that waits, or cut a bake short)."""
    _command("promote", rollout_id, server, token, as_json)
