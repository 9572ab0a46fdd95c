"""``edgefleet tokens`` (API tokens, admin) and ``edgefleet audit``."""

from __future__ import annotations

import json
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
    print_json,
)

tokens_app = typer.Typer(no_args_is_help=True, help="API tokens (admin).")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="who or what holds it, e.g. ci-pipeline")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API token; it is printed once and stored only as a hash."""
    result = api_client(server, token).post("/v1/tokens", json={"name": name, "role": role})
    if as_json:
        print_json(result)
    else:
        print(result["token"])


@tokens_app.command("list")
def tokens_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List API tokens (never their secrets)."""
    tokens = api_client(server, token).get("/v1/tokens")
    if as_json:
        print_json(tokens)
        return
    table = Table("id", "name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(
            str(t["id"]), t["name"], t["role"], t["created_at"][:19], (t["revoked_at"] or "-")[:19]
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: int,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API token at once."""
    t = api_client(server, token).request("DELETE", f"/v1/tokens/{token_id}")
    if as_json:
        print_json(t)
        return
    console.print(f"revoked token {t['id']} ({t['name']}, {t['role']})")


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
    events = api_client(server, token).get("/v1/audit", params=params)
    if as_json:
        print_json(events)
        return
    table = Table("when", "actor", "action", "target", "detail")
    for e in events:
        table.add_row(
            e["at"][:19], e["actor"], e["action"], e["target"], json.dumps(e["detail"])[:80]
        )
    console.print(table)
