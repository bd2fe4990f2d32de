"""Edge of the data path: ``sopflow server …``, ``sopflow web`` and ``sopflow demo``.

    sopflow server start|stop|status     the local Prefect server and sopflow's worker
    sopflow web [--host H --port P]       the web app (flows.web)
    sopflow demo                          the whole dose receipt, end to end (flows.cli.demo)

``flows.cli`` mounts ``server_app`` as ``sopflow server`` and ``web`` and ``demo`` at the top.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["demo", "server_app", "web"]

server_app = typer.Typer(help="Start, stop and inspect the local Prefect server and the worker.", no_args_is_help=True)


@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server (embedded default) and the executor, if not running."""
    from flows.services import server

    settings = cli.settings()
    cli.out.print(f"Starting under {settings.home} (first start migrates the database: ~15 s)…")
    for st in cli.run(server.start, settings):
        _print_status(st)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the executor and the local Prefect server."""
    from flows.services import server

    stopped = cli.run(server.stop, cli.settings())
    cli.out.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@server_app.command("deploy")
def server_deploy() -> None:
    """Create the `sopflow` work pool and the run-sop/sopflow deployment (no secret in either)."""
    from flows.services import worker

    made = cli.run(worker.deploy, cli.settings())
    cli.out.print(
        f"work pool {made['work_pool']!r} (type sopflow), deployment {made['deployment']} ({made['deployment_id']})"
    )
    cli.out.print(f"start workers with: prefect worker start --type sopflow --pool {made['work_pool']}")


@server_app.command("status")
def server_status() -> None:
    """Show whether the server and the executor run; exit 1 when either does not."""
    from flows.services import server

    statuses = cli.run(server.status, cli.settings())
    for st in statuses:
        _print_status(st)
    if not all(st.alive for st in statuses):
        raise typer.Exit(1)


def _print_status(st: Any) -> None:
    mark = "[green]running[/green]" if st.alive else "[red]stopped[/red]"
    pid = f" pid {st.pid}" if st.pid else ""
    cli.out.print(f"{st.name:15} {mark}{pid} {escape(st.detail)}  log: {st.log}")


def web(
    host: Annotated[str, typer.Option(help="Address to listen on (behind a TLS proxy in production).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(min=1, help="Processes serving the pages on one port (one per core serves most users at once)."),
    ] = 1,
) -> None:
    """Serve the web app: inbox, step forms and signing, runs, documents, SOPs (English and 中文)."""
    import uvicorn

    from flows.web import create_app
    from flows.web.serving import uvicorn_options

    settings = cli.settings()
    app_ = cli.run(create_app, settings)  # a database behind the code etc. refused here, before any worker starts
    cli.out.print(
        f"sopflow web on http://{host}:{port} (data under {settings.home}"
        f"{f', {workers} worker processes' if workers > 1 else ''}); Ctrl-C stops it"
    )
    # Sessions live in the database (flows.web.sessions): run as many of these behind a proxy as
    # needed, no sticky sessions; ``--workers`` does the same on one port (each worker process makes
    # its app from the environment, as this one did).
    options = uvicorn_options(host=host, port=port, workers=workers, trusted_proxies=settings.trusted_proxies)
    uvicorn.run(app_ if workers == 1 else "flows.web.app:from_environment", **options)


def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Leave the server and executor running afterwards.")] = False,
) -> None:
    """Run the dose-receipt demo end to end: one accepted dose, one with a failed temperature check."""
    from flows.cli.demo import run_demo

    code = cli.run(run_demo, cli.settings(), cli.out, keep=keep)
    raise typer.Exit(code)
