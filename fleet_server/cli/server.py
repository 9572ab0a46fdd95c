"""``edgefleet serve``, ``demo`` and ``broker-config``: running the fleet server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fleet_server.cli.context import (
    console,
)
from fleet_server.settings import Settings


def serve(
    host: Annotated[str | None, typer.Option(help="bind address (EDGEFLEET_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (EDGEFLEET_PORT)")] = None,
    ingest_processes: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=16,
            help="status and telemetry ingest processes beside the API "
            "(EDGEFLEET_INGEST_PROCESSES; default 2 on PostgreSQL, 1 on SQLite; 0: one process)",
        ),
    ] = None,
) -> None:
    """Run the REST API and control plane (+ an embedded broker unless EDGEFLEET_MQTT_URL),
    and the ingest processes."""
    import logging

    from fleet_server.server import serve as run_server

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("botocore", "boto3", "s3transfer"):  # the S3 store's client, at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if ingest_processes is not None:
        overrides["ingest_processes"] = ingest_processes
    run_server(Settings(**overrides))


def ingest(
    index: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="which ingest identity in EDGEFLEET_MQTT_INGEST_DIR to use (one per process; "
            "serve's own take 1 to --ingest-processes)",
        ),
    ],
) -> None:
    """Run one more status and telemetry ingest process (a member of the $share/ groups)
    against the server's database and broker, configured by the same EDGEFLEET_* variables
    as `edgefleet serve`. Runs until interrupted."""
    import logging

    from fleet_server.ingest import run

    settings = Settings()
    if settings.mqtt_url is None:
        raise typer.BadParameter(
            "EDGEFLEET_MQTT_URL is not set: an extra ingest process joins the broker the "
            "server uses"
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    console.print(f"ingest process {index} on {settings.mqtt_url} (Ctrl-C to stop)")
    run(settings, settings.mqtt_url, index)


def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="keep the demo's files here (default: a temp dir)")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="leave everything running to explore (Ctrl-C ends it)")
    ] = False,
) -> None:
    """The whole story on embedded defaults: six devices on three profiles, a model trained
    here, a good canary that goes through and a silently wrong one stopped at its first stage."""
    from fleet_server.demo.story import run_demo

    raise typer.Exit(run_demo(workdir, console, keep=keep))


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
    ca = FleetCA.load_or_create(settings.ca_dir)
    written = write_broker_config(
        ca,
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
    print(f"  export EDGEFLEET_MQTT_INGEST_DIR={written.directory}")
    if written.password_file is None:
        print(f"  export EDGEFLEET_MQTT_CERT_FILE={written.server_cert}")
        print(f"  export EDGEFLEET_MQTT_KEY_FILE={written.server_key}")
    else:
        from sqlmodel import Session

        from fleet_server.auth.broker_files import BrokerFiles
        from fleet_server.database import make_engine
        from fleet_server.schema import check_for_start

        engine = make_engine(settings.resolved_database_url)
        check_for_start(engine)
        files = BrokerFiles(password_file=written.password_file)
        with Session(engine) as session:
            files.write(files.contents(session, ca))
        console.print(f"the enrolled devices' passwords written to {written.password_file}")
        print("  export EDGEFLEET_MQTT_USERNAME=edgefleet-server")
        print(f'  export EDGEFLEET_MQTT_PASSWORD="$(cat {written.server_password})"')
        print(f"  export EDGEFLEET_BROKER_PASSWORD_FILE={written.password_file}")
        console.print(
            "the server rewrites the password file at each enrollment; "
            "reload the broker with: kill -HUP $(pidof mosquitto)"
        )
    # What decommissioning rewrites (the CRL, the ACL) and how the broker rereads them.
    if written.crl_file is not None:
        print(f"  export EDGEFLEET_BROKER_CRL_FILE={written.crl_file}")
    print(f"  export EDGEFLEET_BROKER_ACL_FILE={written.acl}")
    print("  export EDGEFLEET_BROKER_RELOAD_COMMAND='systemctl reload mosquitto'")
    console.print(
        "(the reload command is what makes the broker reread the files the server rewrites "
        "when a device is decommissioned; kill -HUP <mosquitto's pid> does the same)"
    )
    console.print("devices enrolled from then on get a client certificate and this broker URL.")
