"""The ``edgefleet`` commands (typer). Each prints a one-line error and exits 1 when the
operation fails, 2 on a usage error."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edge_agent.contracts.errors import ConfigError, EdgefleetError
from firmware_profiles import ProfileError
from fleet_server.cli.api_client import ApiClient, ApiError, default_token
from fleet_server.settings import Settings

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="edgefleet: ML models on edge fleets."
)
models_app = typer.Typer(no_args_is_help=True, help="Model registry.")
devices_app = typer.Typer(no_args_is_help=True, help="Devices and enrollment.")
rollouts_app = typer.Typer(no_args_is_help=True, help="Deploy model versions to devices.")
bundle_app = typer.Typer(no_args_is_help=True, help="Inspect and verify bundle files offline.")
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(bundle_app, name="bundle")
builds_app = typer.Typer(no_args_is_help=True, help="Compile model versions for device profiles.")
toolchain_app = typer.Typer(no_args_is_help=True, help="Converter toolchains on this machine.")
app.add_typer(builds_app, name="builds")
app.add_typer(toolchain_app, name="toolchain")


def client_from_context() -> ApiClient:
    """For sub-apps defined elsewhere: server and token from the environment."""
    return _client(os.environ.get("EDGEFLEET_SERVER", DEFAULT_SERVER), None)


from fleet_server.cli.keys import keys_app  # noqa: E402  (uses client_from_context)

app.add_typer(keys_app, name="keys")

console = Console()
err_console = Console(stderr=True)

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="EDGEFLEET_SERVER", help="fleet server URL")
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="EDGEFLEET_TOKEN", help="API token (default: the data dir's admin.token)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
DEFAULT_SERVER = "http://127.0.0.1:8600"


def _client(server: str, token: str | None) -> ApiClient:
    return ApiClient(server, token or default_token(Settings().data_dir))


def _labels(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        out[key] = value
    return out


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# --- serve / demo ---------------------------------------------------------------------------------
@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (EDGEFLEET_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (EDGEFLEET_PORT)")] = None,
) -> None:
    """Run the REST API and control plane (+ an embedded broker unless EDGEFLEET_MQTT_URL)."""
    import logging

    from fleet_server.server import serve as run_server

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    run_server(Settings(**overrides))


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="keep the demo's files here (default: a temp dir)")
    ] = None,
) -> None:
    """The whole story on embedded defaults: server, broker, three devices, a rollout."""
    from hil.demo import run_demo

    raise typer.Exit(run_demo(workdir, console))


@app.command("broker-config")
def broker_config(
    out: Annotated[Path, typer.Option(help="directory to write the broker's files into")],
    host: Annotated[str, typer.Option(help="broker host name or IP devices connect to")],
    port: Annotated[int, typer.Option(help="mTLS listener port")] = 8883,
    bind: Annotated[str, typer.Option(help="listener bind address")] = "0.0.0.0",
    auth: Annotated[
        str, typer.Option(help="mtls (client certificates) or password (fallback)")
    ] = "mtls",
) -> None:
    """Write a Mosquitto config (mTLS, per-device pattern ACLs) signed by this server's fleet
    CA, and the server's own MQTT identity. Run it on the server host (it reads the data dir)."""
    from fleet_server.auth.ca import FleetCA
    from fleet_server.control.broker_config import write_broker_config

    if auth not in ("mtls", "password"):
        raise typer.BadParameter("--auth must be mtls or password")
    settings = Settings()
    written = write_broker_config(
        FleetCA.load_or_create(settings.ca_dir),
        out,
        host=host,
        port=port,
        bind=bind,
        auth=auth,  # type: ignore[arg-type]
    )
    console.print(f"wrote {written.mosquitto_conf} and {written.acl}")
    console.print(f"run the broker:  mosquitto -c {written.mosquitto_conf}")
    console.print("then start the server with:")
    print(f"  export EDGEFLEET_MQTT_URL={written.url}")
    print(f"  export EDGEFLEET_MQTT_CA_FILE={written.ca_cert}")
    if written.password_file is None:
        print(f"  export EDGEFLEET_MQTT_CERT_FILE={written.server_cert}")
        print(f"  export EDGEFLEET_MQTT_KEY_FILE={written.server_key}")
    else:
        from sqlmodel import Session

        from fleet_server.auth.mqtt_passwords import write_password_file
        from fleet_server.database import create_tables, make_engine

        engine = make_engine(settings.resolved_database_url)
        create_tables(engine)
        with Session(engine) as session:
            n = write_password_file(session, written.password_file)
        console.print(f"{n} enrolled device(s) written to {written.password_file}")
        print("  export EDGEFLEET_MQTT_USERNAME=edgefleet-server")
        print(f'  export EDGEFLEET_MQTT_PASSWORD="$(cat {written.server_password})"')
        print(f"  export EDGEFLEET_BROKER_PASSWORD_FILE={written.password_file}")
        console.print(
            "the server rewrites the password file at each enrollment; "
            "reload the broker with: kill -HUP $(pidof mosquitto)"
        )
    console.print("devices enrolled from then on get a client certificate and this broker URL.")


# --- models ---------------------------------------------------------------------------------------
@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ONNX model file")],
    name: Annotated[str, typer.Option(help="model name")],
    version: Annotated[str, typer.Option(help="semantic version, e.g. 1.0.0")],
    description: Annotated[str, typer.Option(help="free text")] = "",
    calibration: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help=".npz calibration set: one array per input name, axis 0 = samples",
        ),
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help=".npz validation set (default: a held-out quarter of the calibration set)",
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model version (with its calibration / validation data for int8 builds)."""
    result = _client(server, token).upload_model(
        file, name, version, description, calibration=calibration, validation=validation
    )
    if as_json:
        _print_json(result)
        return
    ins = ", ".join(f"{s['name']}{s['shape']}:{s['dtype']}" for s in result["inputs"])
    outs = ", ".join(f"{s['name']}{s['shape']}:{s['dtype']}" for s in result["outputs"])
    console.print(
        f"pushed {name} {version} (sha256 {result['source_sha256'][:12]}, opset {result['opset']})"
    )
    console.print(f"  inputs:  {ins}\n  outputs: {outs}")


@models_app.command("list")
def models_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List models and their versions."""
    models = _client(server, token).get("/v1/models")
    if as_json:
        _print_json(models)
        return
    table = Table("model", "versions", "latest")
    for m in models:
        versions = [v["version"] for v in m["versions"]]
        table.add_row(m["name"], ", ".join(versions), versions[-1] if versions else "-")
    console.print(table)


@models_app.command("show")
def models_show(
    name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Show a model's versions with their inputs and outputs."""
    model = _client(server, token).get(f"/v1/models/{name}")
    if as_json:
        _print_json(model)
        return
    table = Table("version", "sha256", "size", "opset", "inputs", "outputs", "created")
    for v in model["versions"]:
        table.add_row(
            v["version"],
            v["source_sha256"][:12],
            str(v["size"]),
            str(v["opset"]),
            ", ".join(f"{s['name']}{s['shape']}" for s in v["inputs"]),
            ", ".join(f"{s['name']}{s['shape']}" for s in v["outputs"]),
            v["created_at"][:19],
        )
    console.print(table)


# --- devices --------------------------------------------------------------------------------------
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
    body = {"profile": profile, "labels": _labels(label), "ttl_s": ttl_s}
    result = _client(server, token).post("/v1/enrollment-tokens", json=body)
    if as_json:
        _print_json(result)
    else:
        print(result["token"])


@devices_app.command("list")
def devices_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List enrolled devices with what they report."""
    devices = _client(server, token).get("/v1/devices")
    if as_json:
        _print_json(devices)
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
    _print_json(_client(server, token).get(f"/v1/devices/{device_id}"))


# --- rollouts -------------------------------------------------------------------------------------
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
    client = _client(server, token)
    body = {
        "model": model,
        "version": version,
        "devices": device or None,
        "selector": _labels(selector) or None,
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
        _print_json(rollout)
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
            build = _follow_build(client, client.get(f"/v1/builds/{build_id}"), quiet)
            if build["state"] == "failed":
                console.print(_render_build(build))
                raise typer.Exit(1)


@rollouts_app.command("status")
def rollouts_status(
    rollout_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-device progress of a rollout."""
    rollout = _client(server, token).get(f"/v1/rollouts/{rollout_id}")
    if as_json:
        _print_json(rollout)
    else:
        console.print(_render_rollout(rollout))


@rollouts_app.command("list")
def rollouts_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """All rollouts, newest first."""
    rollouts = _client(server, token).get("/v1/rollouts")
    if as_json:
        _print_json(rollouts)
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


# --- tokens and audit --------------------------------------------------------------------------
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens (admin).")
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="who or what holds it, e.g. ci-pipeline")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API token; it is printed once and stored only as a hash."""
    result = _client(server, token).post("/v1/tokens", json={"name": name, "role": role})
    if as_json:
        _print_json(result)
    else:
        print(result["token"])


@tokens_app.command("list")
def tokens_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List API tokens (never their secrets)."""
    tokens = _client(server, token).get("/v1/tokens")
    if as_json:
        _print_json(tokens)
        return
    table = Table("id", "name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(
            str(t["id"]), t["name"], t["role"], t["created_at"][:19], (t["revoked_at"] or "-")[:19]
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: int, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None
) -> None:
    """Revoke an API token at once."""
    t = _client(server, token).request("DELETE", f"/v1/tokens/{token_id}")
    console.print(f"revoked token {t['id']} ({t['name']}, {t['role']})")


@app.command()
def audit(
    action: Annotated[str | None, typer.Option(help="e.g. rollout or rollout.create")] = None,
    actor: Annotated[str | None, typer.Option(help="who")] = None,
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 50,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who did what: uploads, enrollments, rollouts, key and token changes."""
    params: dict[str, Any] = {"limit": limit}
    if action:
        params["action"] = action
    if actor:
        params["actor"] = actor
    events = _client(server, token).get("/v1/audit", params=params)
    if as_json:
        _print_json(events)
        return
    table = Table("when", "actor", "action", "target", "detail")
    for e in events:
        table.add_row(
            e["at"][:19], e["actor"], e["action"], e["target"], json.dumps(e["detail"])[:80]
        )
    console.print(table)


# --- bundle ---------------------------------------------------------------------------------------
@bundle_app.command("inspect")
def bundle_inspect(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Print a bundle's manifest."""
    from edge_agent.bundle import open_bundle

    with open_bundle(file) as reader:
        _print_json(reader.manifest.model_dump(mode="json"))


@bundle_app.command("verify")
def bundle_verify(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    trust: Annotated[
        Path | None,
        typer.Option(
            help="root key + keyring JSON (edgefleet keys export-trust) to check the signature"
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="also check it fits this device profile")
    ] = None,
) -> None:
    """Check a bundle: signature (with --trust), structure, file digests and sizes, fit."""
    import shutil
    import tempfile

    from edge_agent.bundle import open_bundle, verify_bundle
    from edge_agent.runtimes import available_runtimes
    from edge_agent.trust import SignedKeyring, TrustStore
    from edge_agent.trust.signing import public_key_from_b64

    with open_bundle(file) as reader:
        manifest, signatures = reader.manifest, reader.signatures
    workdir = Path(tempfile.mkdtemp())
    try:
        store = None
        if trust is not None:
            doc = json.loads(trust.read_text())
            store = TrustStore(
                public_key_from_b64(doc["root_public_key"]), workdir / "keyring.json"
            )
            store.update(SignedKeyring.model_validate(doc["keyring"]))
        verify_bundle(
            file,
            workdir / "bundle",
            profile=profile,
            runtimes=available_runtimes() if profile else None,
            trust=store,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if store is not None:
        signed = f"signature by {', '.join(s.keyid for s in signatures)} verified"
    elif signatures:
        signed = f"signed by {', '.join(s.keyid for s in signatures)} (not checked: pass --trust)"
    else:
        signed = "UNSIGNED"
    console.print(
        f"ok: {manifest.model.name} {manifest.model.version} for {manifest.profile} "
        f"({manifest.runtime.name}/{manifest.precision}), "
        f"{len(manifest.files)} files verified, {signed}"
    )


# --- builds / toolchain ---------------------------------------------------------------------------
def _render_build(b: dict[str, Any]) -> Table:
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
            f"{p['max_abs_error']:.3g}" if p else "",
            f"{p['rel_l2_error']:.3g}" if p else "",
            f"{top1:.3f}" if isinstance(top1, float) else "",
            f"{p['size_bytes'] / 1e6:.2f} MB" if p else "",
            f"{p['latency_ms_median']:.2f} ms" if p else "",
            c.get("error") or "; ".join(p.get("failed", [])),
        )
    return table


def _follow_build(client: ApiClient, build: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Stream the build's log until it finishes, with a spinner showing its state."""
    offset = 0
    with console.status(f"build {build['id']}: {build['state']}…") as status:
        while True:
            chunk = client.get(f"/v1/builds/{build['id']}/log", params={"offset": offset})
            offset = chunk["next_offset"]
            if chunk["text"] and not quiet:
                for line in chunk["text"].rstrip("\n").splitlines():
                    console.print(f"  [dim]{line}[/dim]", highlight=False)
            status.update(f"build {build['id']}: {chunk['state']}…")
            if chunk["state"] in ("succeeded", "failed"):
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
    wait: Annotated[bool, typer.Option(help="follow the log until the build ends")] = True,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile a model version for a profile: converts, runs the parity gate, signs a bundle.
    Exits 1 when the build fails."""
    thresholds: dict[str, float | None] = {}
    for name, value in _labels(threshold).items():
        try:
            thresholds[name] = None if value == "off" else float(value)
        except ValueError:
            raise typer.BadParameter(f"threshold {name}: {value!r} is not a number") from None
    client = _client(server, token)
    body = {
        "model": model,
        "version": version,
        "profile": profile,
        "thresholds": thresholds,
        "runtimes": runtime,
        "precisions": precision,
    }
    build = client.post("/v1/builds", json=body)
    if wait and build["state"] in ("queued", "running"):
        build = _follow_build(client, build, quiet=as_json)
    if as_json:
        _print_json(build)
    else:
        console.print(_render_build(build))
        if build["state"] == "succeeded":
            console.print(
                f"bundle {build['bundle_sha256'][:12]}: {build['runtime']}/{build['precision']}"
                + (f", {build['seconds']:.1f} s" if build.get("seconds") else "")
                + (f", peak RSS {build['peak_rss_mb']:.0f} MB" if build.get("peak_rss_mb") else "")
            )
        elif build["state"] == "failed":
            err_console.print(f"error: {(build['error'] or {}).get('message', 'build failed')}")
    if build["state"] == "failed":
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
    builds = _client(server, token).get("/v1/builds", params=params)
    if as_json:
        _print_json(builds)
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
    build = _client(server, token).get(f"/v1/builds/{build_id}")
    if as_json:
        _print_json(build)
        return
    console.print(_render_build(build))
    if build["error"]:
        console.print(f"error: {build['error']['message']}")


@builds_app.command("logs")
def builds_logs(
    build_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="until the build ends")] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Print a build's log."""
    client = _client(server, token)
    if follow:
        _follow_build(client, client.get(f"/v1/builds/{build_id}"), quiet=False)
        return
    print(client.get(f"/v1/builds/{build_id}/log")["text"], end="")


@toolchain_app.command("install")
def toolchain_install(
    name: Annotated[str, typer.Argument(help="toolchain: tflite")],
    force: Annotated[bool, typer.Option(help="reinstall even when present")] = False,
) -> None:
    """Create a converter toolchain's pinned virtualenv (under $EDGEFLEET_TOOLCHAIN_DIR)."""
    from converters.toolchains import install

    install(name, log=lambda line: console.print(line, highlight=False), force=force)


@toolchain_app.command("list")
def toolchain_list() -> None:
    """Known toolchains and whether they are installed here."""
    from converters.toolchains import TOOLCHAINS, locate

    for name, spec in TOOLCHAINS.items():
        try:
            found = locate(name)
            state = "installed: " + ", ".join(f"{k} {v}" for k, v in found.versions.items())
        except EdgefleetError as e:
            state = e.message
        console.print(f"{name}: {spec.description}\n  {state}", highlight=False)


def run() -> None:
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except (ConfigError, ProfileError) as e:
        err_console.print(f"error: {e.message}")
        sys.exit(2)
    except EdgefleetError as e:
        err_console.print(f"error: {e.message}")
        sys.exit(1)
    except Exception as e:
        # Usage errors: typer vendors its own click, so match click's interface, not a class.
        exit_code, show = getattr(e, "exit_code", None), getattr(e, "show", None)
        if isinstance(exit_code, int) and callable(show):
            show()
            sys.exit(exit_code)
        raise
