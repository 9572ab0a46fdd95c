"""``edgefleet telemetry`` and ``edgefleet alerts``: fleet health from device telemetry."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet_server.cli.context import (
    DEFAULT_SERVER,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    console,
    parse_duration_s,
    print_json,
)

telemetry_app = typer.Typer(no_args_is_help=True, help="Fleet telemetry: latency, errors, drift.")
alerts_app = typer.Typer(no_args_is_help=True, help="Health alerts raised from telemetry.")

SinceOpt = Annotated[str, typer.Option("--since", help="look back this long (90s, 15m, 2h, 7d)")]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@telemetry_app.command("show")
def show(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str | None, typer.Option(help="only this version")] = None,
    since: SinceOpt = "1h",
    shadow: Annotated[bool, typer.Option(help="shadow figures instead of active ones")] = False,
    role: Annotated[
        str | None,
        typer.Option(
            help="active (online requests, the default), shadow, batch (edge-agent score) or "
            "stream (a local stream's messages)"
        ),
    ] = None,
    by_rollout: Annotated[
        bool, typer.Option("--by-rollout", help="a row per rollout that deployed the version")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A table per version x profile: devices reporting, requests, error rate, fleet
    p50/p95/p99 (merged sketches), the worst drift (PSI), and online accuracy from the labels
    applications sent back (right / labelled, and late labels)."""
    params: dict[str, Any] = {
        "since_s": parse_duration_s(since),
        "role": role or ("shadow" if shadow else "active"),
    }
    if version is not None:
        params["version"] = version
    if by_rollout:
        params["by_rollout"] = "true"
    rows = api_client(server, token).get(f"/v1/telemetry/models/{model}", params=params)
    if as_json:
        print_json(rows)
        return
    table = Table(
        "version",
        *(["rollout"] if by_rollout else []),
        "profile",
        "devices",
        "requests",
        "error rate",
        "NaN/inf",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "worst PSI",
        "accuracy",
        title=f"{model}: last {since}" + (" (shadow)" if shadow else ""),
    )
    for r in rows:
        worst = max(r["drift"], key=lambda d: d["psi"] or 0, default=None)
        drift = "-"
        if worst is not None and worst["psi"] is not None:
            drift = f"{worst['psi']:.3f} ({worst['io']} {worst['tensor']}[{worst['worst_group']}])"
        rate = r["error_rate"]
        table.add_row(
            r["version"],
            *([r.get("rollout_id") or "-"] if by_rollout else []),
            r["profile"],
            str(r["devices"]),
            str(r["requests"]),
            "-" if rate is None else f"{rate:.2%}",
            str(r["nonfinite"]),
            _ms(r["latency_ms"]["p50"]),
            _ms(r["latency_ms"]["p95"]),
            _ms(r["latency_ms"]["p99"]),
            drift,
            _accuracy(r),
        )
    console.print(table)
    if not rows:
        console.print(f"no telemetry for {model} in the last {since}")


def _accuracy(row: dict[str, Any]) -> str:
    if not row.get("labelled"):
        return f"- ({row['late']} late)" if row.get("late") else "-"
    text = f"{row['accuracy']:.2%} of {row['labelled']}"
    return text + (f", {row['late']} late" if row.get("late") else "")


@telemetry_app.command("plot")
def plot(
    model: Annotated[str, typer.Argument(help="model name")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write")],
    version: Annotated[str | None, typer.Option(help="only this version")] = None,
    since: SinceOpt = "24h",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Latency (p50/p95) and drift (worst PSI) over time per version x profile, as a PNG."""
    params: dict[str, Any] = {"since_s": parse_duration_s(since)}
    if version is not None:
        params["version"] = version
    points = api_client(server, token).get(f"/v1/telemetry/models/{model}/series", params=params)
    if not points:
        raise typer.BadParameter(f"no telemetry for {model} in the last {since}: nothing to plot")
    render_plot(model, points, out)
    console.print(f"wrote {out} ({len(points)} points)")


def render_plot(model: str, points: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        series.setdefault(f"{p['version']} / {p['profile']}", []).append(p)
    fig, (lat, drift) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for label, rows in sorted(series.items()):
        when = [datetime.fromisoformat(r["bucket_start"]) for r in rows]
        p95 = [r["latency_ms"]["p95"] for r in rows]
        p50 = [r["latency_ms"]["p50"] for r in rows]
        line = lat.plot(when, p95, marker=".", label=f"{label} p95")[0]
        lat.plot(when, p50, linestyle="--", color=line.get_color(), label=f"{label} p50")
        drift.plot(when, [r["worst_psi"] for r in rows], marker=".", label=label)
    lat.set_ylabel("latency (ms)")
    lat.set_title(f"{model}: fleet latency and drift")
    lat.legend(fontsize="small")
    drift.axhline(0.25, color="red", linewidth=0.8, linestyle=":", label="PSI 0.25")
    drift.set_ylabel("worst PSI")
    drift.legend(fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


@telemetry_app.command("ingest")
def ingest() -> None:
    """Run one more telemetry ingest process (a member of the $share/ group) against the
    server's database and broker (configured by the same EDGEFLEET_* variables as
    `edgefleet serve`). Runs until interrupted."""
    from fleet_server.artifacts import open_store
    from fleet_server.database import make_engine
    from fleet_server.heap import settle
    from fleet_server.schema import check_for_start
    from fleet_server.settings import Settings
    from fleet_server.telemetry.service import TelemetryService

    settings = Settings()
    if settings.mqtt_url is None:
        raise typer.BadParameter(
            "EDGEFLEET_MQTT_URL is not set: an extra ingest process joins the broker the "
            "server uses"
        )
    engine = make_engine(settings.resolved_database_url)
    check_for_start(engine)
    service = TelemetryService(
        engine,
        open_store(settings),
        bucket_s=settings.telemetry_bucket_s,
        window_s=settings.telemetry_window_s,
    )
    ingest = service.start_ingest(settings.mqtt_url)
    settle()
    if service.connection is not None and not service.connection.subscribed.wait(30):
        console.print(f"warning: no subscription granted by {settings.mqtt_url} yet; retrying")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    console.print(f"telemetry ingest on {settings.mqtt_url} (Ctrl-C to stop)")
    stop.wait()
    service.stop()
    console.print(f"stored {ingest.stored_total} batch(es)")


@alerts_app.command("list")
def alerts_list(
    state: Annotated[str, typer.Option(help="open, resolved or all")] = "open",
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Alerts raised from fleet telemetry, with their figures."""
    params: dict[str, Any] = {"state": state}
    if model is not None:
        params["model"] = model
    rows = api_client(server, token).get("/v1/alerts", params=params)
    if as_json:
        print_json(rows)
        return
    table = Table("id", "raised", "model", "version", "profile", "kind", "state", "message")
    for a in rows:
        table.add_row(
            str(a["id"]),
            a["raised_at"][:19],
            a["model"],
            a["version"],
            a["profile"],
            a["kind"] + (f" {a['subject']}" if a["subject"] else ""),
            a["state"],
            a["message"],
        )
    console.print(table)


@alerts_app.command("policy")
def alerts_policy(
    model: Annotated[str, typer.Argument(help="model name")],
    max_error_rate: Annotated[float | None, typer.Option(help="e.g. 0.01")] = None,
    max_latency_ratio: Annotated[
        float | None, typer.Option(help="p95 vs the previous version's, e.g. 1.5")
    ] = None,
    max_psi: Annotated[float | None, typer.Option(help="e.g. 0.25")] = None,
    min_requests: Annotated[int | None, typer.Option(help="fewer: not judged")] = None,
    off: Annotated[
        list[str] | None, typer.Option(help="disable a check: max_error_rate, ... (repeatable)")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the model's alert thresholds; with options, change those named."""
    client = api_client(server, token)
    path = f"/v1/models/{model}/alert-policy"
    policy = client.get(path)
    changes = {
        "max_error_rate": max_error_rate,
        "max_latency_ratio": max_latency_ratio,
        "max_psi": max_psi,
        "min_requests": min_requests,
    }
    unknown = sorted(set(off or ()) - {"max_error_rate", "max_latency_ratio", "max_psi"})
    if unknown:
        raise typer.BadParameter(
            f"--off takes max_error_rate, max_latency_ratio or max_psi: {unknown}"
        )
    changes = {k: v for k, v in changes.items() if v is not None}
    changes.update({name: None for name in off or ()})
    if changes:
        policy = client.put(path, json={**policy, **changes})
    if as_json:
        print_json(policy)
        return
    for key, value in policy.items():
        console.print(f"{key}: {'off' if value is None else value}")


@telemetry_app.command("retention")
def retention(
    apply_now: Annotated[
        bool, typer.Option("--apply", help="merge and prune now (the server does it hourly)")
    ] = False,
    now: Annotated[
        str | None,
        typer.Option(help="act as of this UTC time (ISO 8601), to see what a policy keeps"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The telemetry retention policy (EDGEFLEET_TELEMETRY_RETENTION) and the rollup rows it
    governs; with --apply, merge aged rows into coarser buckets and prune past the last keep.
    Works on the server's database directly (EDGEFLEET_DATABASE_URL)."""
    from datetime import UTC, datetime

    from fleet_server.database import make_engine
    from fleet_server.schema import check_for_start
    from fleet_server.settings import Settings
    from fleet_server.telemetry.retention import RetentionPolicy, apply, row_count

    settings = Settings()
    policy = RetentionPolicy.parse(settings.telemetry_retention, settings.telemetry_bucket_s)
    when = None
    if now is not None:
        try:
            when = datetime.fromisoformat(now)
        except ValueError as e:
            raise typer.BadParameter(f"--now {now!r} is not an ISO 8601 time") from e
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    engine = make_engine(settings.resolved_database_url)
    try:
        check_for_start(engine)  # a database behind its migrations is refused
        before = row_count(engine)
        done = apply(engine, policy, when) if apply_now else None
        after = row_count(engine)
    finally:
        engine.dispose()
    tiers = [{"resolution_s": t.resolution_s, "keep_s": t.keep_s} for t in policy.tiers]
    if as_json:
        print_json(
            {
                "policy": settings.telemetry_retention,
                "tiers": tiers,
                "rows_before": before,
                "rows": after,
                "applied": None
                if done is None
                else {
                    "merged": done.merged,
                    "written": done.written,
                    "pruned": done.pruned,
                    "device_rows": done.device_rows,
                    "spans": done.spans,
                },
            }
        )
        return
    shown = ", ".join(
        f"{t.resolution_s} s buckets kept "
        + (f"{t.keep_s // 86400} d" if t.keep_s is not None else "for good")
        for t in policy.tiers
    )
    console.print(f"policy {settings.telemetry_retention!r}: {shown}")
    if done is not None:
        console.print(
            f"merged {done.merged} rollup rows into {done.written} over {done.spans} coarse "
            f"buckets, pruned {done.pruned}, {done.device_rows} device-count rows"
        )
    console.print(
        f"rollup rows {before['rollups']} → {after['rollups']}, device-count rows "
        f"{before['device_buckets']} → {after['device_buckets']}"
    )
