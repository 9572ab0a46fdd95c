"""``edgefleet toolchain``: converter toolchains on this machine."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from edge_agent.contracts.errors import EdgefleetError
from fleet_server.cli.context import (
    JsonOpt,
    console,
    print_json,
)

toolchain_app = typer.Typer(no_args_is_help=True, help="Converter toolchains on this machine.")


@toolchain_app.command("install")
def toolchain_install(
    name: Annotated[str, typer.Argument(help="toolchain: tflite")],
    force: Annotated[bool, typer.Option(help="reinstall even when present")] = False,
) -> None:
    """Create a converter toolchain's pinned virtualenv (under $EDGEFLEET_TOOLCHAIN_DIR)."""
    from converters.toolchains import install

    install(name, log=lambda line: console.print(line, highlight=False), force=force)


@toolchain_app.command("list")
def toolchain_list(as_json: JsonOpt = False) -> None:
    """Known toolchains and whether they are installed here."""
    from converters.toolchains import TOOLCHAINS, locate

    found_all: dict[str, dict[str, Any]] = {}
    for name, spec in TOOLCHAINS.items():
        try:
            versions = locate(name).versions
            found_all[name] = {"installed": True, "versions": versions}
            state = "installed: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        except EdgefleetError as e:
            found_all[name] = {"installed": False, "message": e.message}
            state = e.message
        if not as_json:
            console.print(f"{name}: {spec.description}\n  {state}", highlight=False)
    if as_json:
        print_json(found_all)
