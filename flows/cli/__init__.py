"""Edge of the data path: the ``sopflow`` command line (Typer), thin over ``flows.services``.

    sopflow server start|stop|status     the local Prefect server and sopflow's executor
    sopflow start SOP_ID --institution I --set k=v --as USER      start a run
    sopflow submit RUN STEP --as USER --set k=v [--json FILE]     enter data and sign a step
    sopflow runs                          open and finished runs, with what each waits on
    sopflow inbox --as USER               steps waiting on that user's roles
    sopflow record RUN [--json]           the quality record of a run
    sopflow audit verify [--against FILE] walk the chain, rows, signatures and signed checkpoints; name each break
    sopflow audit key|checkpoint         the checkpoints' public key; sign a checkpoint now
    sopflow correct RUN STEP --as USER --set k=v --reason R   correct a signed entry (flows.cli.records)
    sopflow audit verify-export FILE      check an exported record offline
    sopflow user add|disable|enable|passwd|unlock|list   accounts (see flows.cli.admin)
    sopflow training grant|list           who is trained on which SOP version
    sopflow sop validate|schema|list|show SOP definitions
    sopflow web [--host H --port P]       the web app (flows.web)
    sopflow deviations [--all]            open deviations and overdue CAPAs (see flows.cli.quality)
    sopflow deviation raise --run ID|--coi COI --class C --reason R --as U   raise one by hand
    sopflow chain COI                     every run that touched one dose; is its chain unbroken?
    sopflow sop establish|draft|submit|versions|diff|review|retire|export|import   change control (flows.cli.changes)
    sopflow training overdue              training due on issued SOP versions and not recorded
    sopflow demo                          the whole dose receipt, end to end
    sopflow init DIR / admin init / institution add|list / user grant|revoke   setting up (flows.cli.institutions)
    sopflow token create|list|revoke      integration API tokens (flows.cli.tokens)
    sopflow --version                     the installed version

Passwords are asked for, or read from the variable named by ``--password-env`` (default
``SOPFLOW_PASSWORD``) for scripts. Only this layer formats errors (``flows.cli.common``): one red
line per problem, exit code 1, no traceback unless ``--debug``, for a configuration mistake too
(``main``). Imports stay light: each command imports the service it calls, so ``sopflow --help``
loads neither SQLModel nor Prefect.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from flows.cli import common
from flows.cli.admin import training_app, user_app
from flows.cli.changes import register as register_changes
from flows.cli.database import db_app
from flows.cli.institutions import register as register_institutions
from flows.cli.quality import chain, deviation_app, deviations
from flows.cli.records import correct, verify_export
from flows.cli.runs import audit_app, runs_app
from flows.cli.server import demo, server_app, web
from flows.cli.sop import app as sop_app
from flows.cli.tokens import token_app
from flows.errors import FlowsError

__all__ = ["app", "main"]

app = typer.Typer(
    name="sopflow",
    help="SOP workflows for cell-therapy doses, with signed human steps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(runs_app)
app.add_typer(sop_app, name="sop")
app.add_typer(server_app, name="server")
app.add_typer(audit_app, name="audit")
app.add_typer(user_app, name="user")
app.add_typer(training_app, name="training")
app.add_typer(token_app, name="token")
app.add_typer(db_app, name="db")
app.add_typer(deviation_app, name="deviation")
app.command("correct")(correct)
app.command("deviations")(deviations)
app.command("chain")(chain)
app.command("web")(web)
app.command("demo")(demo)
audit_app.command("verify-export")(verify_export)
register_changes(sop_app, training_app)
register_institutions(app, user_app)


def _version(value: bool) -> None:
    if value:
        from flows import __version__

        common.out.print(f"sopflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    common.state.debug = debug


def main() -> None:
    """The ``sopflow`` command. A mistake in the configuration (``SOPFLOW_*`` variables read before
    any command runs) or a folder sopflow cannot write is one red line and exit 1, never a traceback."""
    try:
        app()
    except FlowsError as exc:
        if common.state.debug:
            raise
        common.fail(exc)
        sys.exit(1)
    except OSError as exc:
        if common.state.debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        common.err.print(f"[red]error:[/red] cannot use{where}: {exc.strerror or exc}")
        sys.exit(1)
