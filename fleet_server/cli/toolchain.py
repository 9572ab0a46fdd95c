"""``edgefleet toolchain``: converter toolchains on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from edge_agent.contracts.errors import EdgefleetError
from fleet_server.cli.context import (
    console,
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
