"""``edge-agent``: enroll a device, run the daemon, show its status.

Standard library only (argparse, urllib): the agent must install light on a Raspberry Pi.
Exit codes: 0 ok, 1 operation failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from edge_agent.config import AgentConfig, render_config
from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import ConfigError, EdgefleetError
from edge_agent.link.identity import certificate_facts, new_key_and_csr, server_message
from edge_agent.logs import configure as configure_logging
from edge_agent.protocol.enrollment import EnrollRequest, EnrollResponse
from edge_agent.runtimes import available_runtimes
from firmware_profiles import ProfileError


def _enroll(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    config_path = directory / "agent.toml"
    if config_path.exists() and not args.force:
        print(f"error: {config_path} exists; pass --force to enroll again", file=sys.stderr)
        return 2
    key_pem, csr = new_key_and_csr(args.device_id)
    request_body = EnrollRequest(
        token=args.token,
        device_id=args.device_id,
        profile=args.profile,
        labels=dict(_label(x) for x in args.label),
        expected_root_public_key=args.root_key,
        csr=csr,
        # The server builds for the runtimes this device has (e.g. no TensorRT engine for a
        # Jetson whose image lacks TensorRT); status reports keep it up to date.
        runtimes=available_runtimes(),
    )
    request = urllib.request.Request(
        args.server.rstrip("/") + "/v1/devices/enroll",
        data=json.dumps(
            {k: v for k, v in request_body.to_dict().items() if v is not None}
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            reply = EnrollResponse.from_json(resp.read())
    except urllib.error.HTTPError as e:
        print(f"error: enrollment refused: {server_message(e)}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"error: cannot reach {args.server}: {e.reason}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {args.server} answered enrollment with something else: {e}", file=sys.stderr)
        return 1
    if args.root_key and args.root_key != reply.root_public_key:
        print(
            "error: the server's root key differs from --root-key; refusing to enroll "
            "(wrong server, or someone in between)",
            file=sys.stderr,
        )
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root.pub").write_text(reply.root_public_key + "\n")
    write_atomic(
        directory / "device.mqtt-password", (reply.mqtt_password + "\n").encode(), mode=0o600
    )
    if reply.client_cert:
        write_atomic(directory / "device.key", key_pem, mode=0o600)
        (directory / "device.crt").write_text(reply.client_cert)
        (directory / "ca.crt").write_text(reply.ca_cert or "")
        certificate_facts(directory / "device.crt")  # so the agent need not parse it
    write_atomic(directory / "device.secret", (reply.device_secret + "\n").encode(), mode=0o600)
    config_path.write_text(
        render_config(
            device_id=reply.device_id,
            profile=reply.profile,
            server_url=reply.server_url,
            mqtt_url=reply.mqtt_url,
            serving_port=args.serving_port,
            tls=bool(reply.client_cert),
            mqtt_password_file="device.mqtt-password",
        )
    )
    print(f"enrolled {reply.device_id} ({reply.profile}); config written to {config_path}")
    print(f"run it with: edge-agent run --config {config_path}")
    return 0


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label must be key=value, got {text!r}")
    return key, value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 1000000, not {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent  # imports the runtime stack; keep `enroll` fast

    config = AgentConfig.load(Path(args.config))
    agent = Agent(config)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    agent.start()
    try:
        agent.wait()
    finally:
        agent.stop()
    return 0


def _status(args: argparse.Namespace) -> int:
    from edge_agent.lifecycle.journal import Journal
    from edge_agent.serving.client import AgentClient

    config = AgentConfig.load(Path(args.config))
    journal = Journal(config.state_dir / "journal.json", owner=False)
    client = AgentClient(f"http://{config.serving.host}:{config.serving.port}", timeout_s=5)
    serving = {m["slot"]: m for m in client.models()} if client.ready() else {}
    report = {
        "device_id": config.device_id,
        "profile": config.profile,
        "desired_seq": journal.data.desired_seq,
        "daemon": "serving" if serving else "not serving",
        "slots": {
            name: {
                "state": rec.state,
                "committed": rec.committed.version if rec.committed else None,
                "previous": rec.previous.version if rec.previous else None,
                "serving": serving.get(name, {}).get("version"),
                "error": rec.error,
            }
            for name, rec in journal.data.slots.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    from edge_agent import scoring
    from edge_agent.serving.client import AgentError

    config = AgentConfig.load(Path(args.config))
    out = Path(args.out)
    files = scoring.find_inputs(args.inputs)
    if not files:
        print(f"error: {args.inputs}: no .npy or .npz files there", file=sys.stderr)
        return 2
    client = scoring.agent_client(
        config.serving.unix_socket, config.serving.host, config.serving.port
    )
    progress = None if args.quiet else scoring.Progress()
    scorer = scoring.Scorer(
        client,
        args.model,
        out,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=progress,
    )
    try:
        result = scorer.run(files)
    except AgentError as e:
        print(f"error: the agent refused: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; scored rows so far are kept in {scorer.parts} and the next run "
            "skips their files",
            file=sys.stderr,
        )
        return 130
    versions = ", ".join(f"{v} ({n} rows)" for v, n in sorted(result.versions.items()))
    print(
        f"scored {result.scored_files} file(s), {result.rows} row(s) in {result.seconds:.2f} s"
        f" with {args.model} {versions or '-'}; {result.skipped} already in {out}"
        f"; {len(result.failures)} failed"
    )
    report = scoring.failures_report(out, result.failures)
    if report is not None:
        print(f"error: {len(result.failures)} file(s) not scored (listed in {report}):",
              file=sys.stderr)  # fmt: skip
        for line in scoring.iter_lines(result.failures):
            print(line, file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="edgefleet edge agent")
    parser.add_argument("--log-level", default=os.environ.get("EDGE_AGENT_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("EDGE_AGENT_LOG_FORMAT", "text"),
        help="json: one object per line (journald, log shippers)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    enroll = sub.add_parser("enroll", help="enroll this device with a one-time token")
    enroll.add_argument("--server", required=True, help="fleet server URL, e.g. http://fleet:8600")
    enroll.add_argument("--token", required=True, help="one-time enrollment token")
    enroll.add_argument(
        "--device-id", default=socket.gethostname().lower(), help="default: hostname"
    )
    enroll.add_argument("--profile", required=True, help="device profile, e.g. raspberry-pi-5")
    enroll.add_argument("--label", action="append", default=[], help="key=value (repeatable)")
    enroll.add_argument("--dir", default=".", help="where to write agent.toml and device.secret")
    enroll.add_argument("--serving-port", type=int, default=8651)
    enroll.add_argument("--force", action="store_true", help="overwrite an existing agent.toml")
    enroll.add_argument(
        "--root-key",
        help="the fleet root public key (base64) obtained out of band; enrollment fails if the "
        "server presents another (default: trust the server on first use)",
    )
    enroll.set_defaults(func=_enroll)

    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", required=True, help="path to agent.toml")
    run.set_defaults(func=_run)

    score = sub.add_parser(
        "score",
        help="score input files through the model the running agent serves (batch)",
        description="Runs every .npy/.npz input through the running agent's model in batches "
        "and writes each row's outputs with the version that produced it. Resumable: a second "
        "run skips the files already written.",
    )
    score.add_argument("--config", required=True, help="path to agent.toml")
    score.add_argument("--model", required=True, help="model or slot name")
    score.add_argument(
        "--in", dest="inputs", required=True, help="a directory of .npy/.npz files, or a glob"
    )
    score.add_argument("--out", required=True, help="results: FILE.npz or FILE.parquet")
    score.add_argument(
        "--batch-size", type=_positive, default=64, help="rows per request (default 64)"
    )
    score.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes that read the files and send them (default: 2, or 1 on one CPU)",
    )
    score.add_argument("--quiet", action="store_true", help="no progress line")
    score.set_defaults(func=_score)

    status = sub.add_parser("status", help="show what this device runs")
    status.add_argument("--config", required=True, help="path to agent.toml")
    status.set_defaults(func=_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except (ConfigError, ProfileError) as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except EdgefleetError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
