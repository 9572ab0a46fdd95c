"""What every ``edgefleet`` command group shares: the consoles, the server and token options,
and the API client they build."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet_server.client import ApiClient, default_token
from fleet_server.settings import Settings

#: Server text goes to the terminal as it is: rich markup would delete "[samples, 128]" from
#: a message. Styles are given as ``style=`` or ``Text``, never as markup.
console = Console(markup=False)
#: Errors are one line each, however narrow the terminal (or none: a pipe, a CI log).
err_console = Console(stderr=True, markup=False, soft_wrap=True)

DEFAULT_SERVER = "http://127.0.0.1:8600"
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


def api_client(server: str, token: str | None) -> ApiClient:
    return ApiClient(server, token or default_token(Settings().data_dir))


def client_from_env() -> ApiClient:
    """Server and token from the environment (commands without --server/--token options)."""
    return api_client(os.environ.get("EDGEFLEET_SERVER", DEFAULT_SERVER), None)


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        out[key] = value
    return out


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"expected a duration like 90s, 15m, 2h or 7d, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
