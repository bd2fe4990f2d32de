"""Edge of the data path: ``sopflow db status`` and ``sopflow db upgrade`` (flows.services.database).

    sopflow db status     where the database stands against this sopflow's schema; exit 1 unless current
    sopflow db upgrade    apply the pending migrations, in one transaction under the schema lock

Every other command refuses a database that is behind or ahead of the code with one line naming
``sopflow db upgrade``; these two are the ones that work on it.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["db_app"]

db_app = typer.Typer(help="The schema of sopflow's database: where it stands, and upgrading it.", no_args_is_help=True)


@db_app.command("status")
def db_status() -> None:
    """Say where the database stands: current, behind (and what an upgrade applies), ahead; exit 1 unless current."""
    from flows.services import database

    st = cli.run(database.status, cli.settings())
    cli.out.print(f"database  {escape(st.url)}")
    revision = st.revision or "none"
    if not st.versioned and st.revision:
        revision += " (made before versioning; recognised by its tables)"
    cli.out.print(f"revision  {revision}")
    cli.out.print(f"code      {st.head}")
    words = {
        "current": "[green]current[/green]",
        "empty": "empty: the first command creates the tables",
        "behind": "[red]behind[/red]: run `sopflow db upgrade` (back the database up first)",
        "ahead": "[red]ahead[/red] of this sopflow",
        "unknown": "[red]unknown[/red]: sopflow tables of no release",
    }
    cli.out.print(f"state     {words[st.state]}")
    for line in st.pending:
        cli.out.print(f"  pending {escape(line)}")
    if st.refusal and st.state in ("ahead", "unknown"):
        cli.err.print(f"[red]error:[/red] {escape(st.refusal)}")
    if st.state not in ("current", "empty"):
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the pending migrations (one transaction, under the schema lock). Back the database up first."""
    from flows.services import database

    settings = cli.settings()
    applied = cli.run(database.upgrade, settings)
    st = cli.run(database.status, settings)
    if not applied:
        cli.out.print(f"the database is already at revision {st.head}: nothing to do")
        return
    for line in applied:
        cli.out.print(f"applied {escape(line)}")
    cli.out.print(f"the database is at revision {st.revision}")
