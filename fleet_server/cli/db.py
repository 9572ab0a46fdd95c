"""``edgefleet db``: the database's schema revision, and its migrations. Works on the database
the server's settings name (EDGEFLEET_DATABASE_URL, or the data dir's SQLite file)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from fleet_server.cli.context import JsonOpt, console, print_json

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

db_app = typer.Typer(no_args_is_help=True, help="The database: schema revision and migrations.")

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="the database (default: EDGEFLEET_DATABASE_URL, else the data dir's SQLite file)",
    ),
]


def _engine(url: str | None) -> Engine:
    from fleet_server.database import make_engine
    from fleet_server.settings import Settings

    settings = Settings(database_url=url) if url else Settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@db_app.command("status")
def status(database_url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """The database's revision, this edgefleet's head, and the revisions an upgrade would
    apply. Exits 1 when the server would refuse the database (behind, ahead, unversioned)."""
    from fleet_server.schema import SchemaState, explain
    from fleet_server.schema import status as read_status

    engine = _engine(database_url)
    try:
        found = read_status(engine)
    finally:
        engine.dispose()
    if as_json:
        print_json(
            {
                "state": found.state.value,
                "revision": found.revision,
                "head": found.head,
                "pending": found.pending,
            }
        )
    else:
        console.print(
            f"{found.state.value}: revision {found.revision or '-'}, head {found.head}"
            + (f", pending {' '.join(found.pending)}" if found.pending else "")
        )
    if found.state not in (SchemaState.CURRENT, SchemaState.EMPTY):
        if not as_json:
            console.print(explain(found, engine))
        raise typer.Exit(1)


@db_app.command("upgrade")
def upgrade(database_url: UrlOpt = None) -> None:
    """Apply every migration the database lacks (back it up first). A database made before
    edgefleet had migrations is adopted when it holds the baseline's tables and columns.
    Nothing is changed when it fails: each upgrade runs in one transaction."""
    from fleet_server.schema import SchemaState
    from fleet_server.schema import upgrade as run_upgrade

    engine = _engine(database_url)
    try:
        done = run_upgrade(engine)
    finally:
        engine.dispose()
    if not done.applied:
        console.print(f"the database is at head ({done.after}): nothing to do")
        return
    adopted = (
        " (adopted a database made before migrations)"
        if done.before.state is SchemaState.UNVERSIONED
        else ""
    )
    console.print(
        f"upgraded from {done.before.revision or 'nothing'} to {done.after}{adopted}: "
        f"applied {' '.join(done.applied)}"
    )
