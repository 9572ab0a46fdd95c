"""The ``edgefleet`` command line: the root app, one command group a module, and the exit
codes (0 ok, 1 operation failed, 2 usage or configuration error)."""

from __future__ import annotations

import sys

import typer

from edge_agent.contracts.errors import ConfigError, EdgefleetError
from firmware_profiles import ProfileError
from fleet_server.cli import (
    builds,
    bundle,
    db,
    devices,
    keys,
    models,
    rollouts,
    server,
    telemetry,
    tokens,
    toolchain,
)
from fleet_server.cli.context import err_console

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="edgefleet: ML models on edge fleets."
)
app.command()(server.serve)
app.command()(server.ingest)
app.command()(server.demo)
app.command("broker-config")(server.broker_config)
app.command()(tokens.audit)
app.add_typer(models.models_app, name="models")
app.add_typer(devices.devices_app, name="devices")
app.add_typer(rollouts.rollouts_app, name="rollouts")
app.add_typer(bundle.bundle_app, name="bundle")
app.add_typer(builds.builds_app, name="builds")
app.add_typer(toolchain.toolchain_app, name="toolchain")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(db.db_app, name="db")
app.add_typer(tokens.tokens_app, name="tokens")
app.add_typer(telemetry.telemetry_app, name="telemetry")
app.add_typer(telemetry.alerts_app, name="alerts")


def _plugins() -> None:
    """Command groups other packages add through the ``edgefleet.cli`` entry point (``hil``:
    the rigs and scenarios, a floor above the server that the server does not import)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="edgefleet.cli"):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except ImportError as e:  # a part that is not installed; the rest still works
            err_console.print(f"note: 'edgefleet {ep.name}' is unavailable: {e}")


_plugins()


def run() -> None:
    try:
        # Outside standalone mode click returns a command's exit code (typer.Exit(1) on a
        # failed build) instead of exiting with it: pass it on.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
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
