"""Edge of the data path: the ``sopflow`` command line (Typer), thin over ``flows.service``.

    sopflow server start|stop|status     the local Prefect server and sopflow's executor
    sopflow start SOP_ID --institution I --set k=v --as USER      start a run
    sopflow submit RUN STEP --as USER --set k=v [--json FILE]     enter data and sign a step
    sopflow runs                          open and finished runs, with what each waits on
    sopflow inbox --as USER               steps waiting on that user's roles
    sopflow record RUN [--json]           the quality record of a run
    sopflow audit verify                  walk the audit chain; name the first broken row
    sopflow correct RUN STEP --as USER --set k=v --reason R   correct a signed entry (see flows.cli.records)
    sopflow audit verify-export FILE      check an exported record offline
    sopflow user add|disable|enable|passwd|unlock|list   accounts (see flows.cli.admin)
    sopflow training grant|list           who is trained on which SOP version
    sopflow sop validate|schema|list|show SOP definitions
    sopflow web [--host H --port P]       the web app (flows.web)
    sopflow deviations [--all]            open deviations and overdue CAPAs (see flows.cli.quality)
    sopflow chain COI                     every run that touched one dose; is its chain unbroken?
    sopflow sop establish|draft|submit|versions|diff|review|retire|export|import   change control (flows.cli.changes)
    sopflow training overdue              training due on issued SOP versions and not recorded
    sopflow demo                          the whole dose receipt, end to end

Passwords are asked for, or read from the variable named by ``--password-env`` (default
``SOPFLOW_PASSWORD``) for scripts. Only this layer formats errors: one red line per problem,
exit code 1, no traceback unless ``--debug``. Imports stay light: Prefect is imported only by
the commands that talk to it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from flows.cli.admin import training_app, user_app
from flows.cli.changes import register as register_changes
from flows.cli.quality import chain, deviations
from flows.cli.records import correct, verify_export
from flows.cli.sop import app as sop_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="sopflow",
    help="SOP workflows for cell-therapy doses, with signed human steps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(
    help="Start, stop and inspect the local Prefect server and the executor.", no_args_is_help=True
)
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
app.add_typer(sop_app, name="sop")
app.add_typer(server_app, name="server")
app.add_typer(audit_app, name="audit")
app.add_typer(user_app, name="user")
app.add_typer(training_app, name="training")
app.command("correct")(correct)
app.command("deviations")(deviations)
app.command("chain")(chain)
audit_app.command("verify-export")(verify_export)
register_changes(sop_app, training_app)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_DEBUG = False

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="A value as key=value (repeatable).")]
AsOpt = Annotated[str, typer.Option("--as", help="Your sopflow user name.")]
PasswordEnv = Annotated[
    str, typer.Option("--password-env", help="Read the password from this environment variable when it is set.")
]


def _settings() -> Any:
    from flows.config import get_settings

    return get_settings()


def _pairs(items: list[str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--set")
        values[key.strip()] = value
    return values


def _password(username: str, env_name: str) -> str:
    value = os.environ.get(env_name)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise typer.BadParameter(
            f"no terminal to ask for {username!r}'s password; set {env_name}", param_hint="--password-env"
        )
    return str(typer.prompt(f"Password for {username}", hide_input=True))


def _fail(exc: Exception) -> typer.Exit:
    from flows.errors import SopDefinitionError, SopInputError

    lines = (
        [str(p) for p in exc.problems] if isinstance(exc, SopDefinitionError | SopInputError) else str(exc).splitlines()
    )
    for line in lines or [type(exc).__name__]:
        err.print(f"[red]error:[/red] {escape(line)}")
    return typer.Exit(1)


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the service; turn a FlowsError into red lines and exit 1."""
    from flows.errors import FlowsError

    try:
        return fn(*args, **kwargs)
    except FlowsError as exc:
        if _DEBUG:
            raise
        raise _fail(exc) from None


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    global _DEBUG
    _DEBUG = debug


# -- server -------------------------------------------------------------------------------------
@server_app.command("start")
def server_start() -> None:
    """Start the local Prefect server (embedded default) and the executor, if not running."""
    from flows.engine import server

    settings = _settings()
    out.print(f"Starting under {settings.home} (first start migrates the database: ~15 s)…")
    for st in _run(server.start, settings):
        _print_status(st)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the executor and the local Prefect server."""
    from flows.engine import server

    stopped = _run(server.stop, _settings())
    out.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@server_app.command("status")
def server_status() -> None:
    """Show whether the server and the executor run; exit 1 when either does not."""
    from flows.engine import server

    statuses = _run(server.status, _settings())
    for st in statuses:
        _print_status(st)
    if not all(st.alive for st in statuses):
        raise typer.Exit(1)


def _print_status(st: Any) -> None:
    mark = "[green]running[/green]" if st.alive else "[red]stopped[/red]"
    pid = f" pid {st.pid}" if st.pid else ""
    out.print(f"{st.name:15} {mark}{pid} {escape(st.detail)}  log: {st.log}")


# -- runs ---------------------------------------------------------------------------------------
@app.command("start")
def start(
    sop_id: str,
    institution: Annotated[str, typer.Option(help="Institution id (folder under sops/).")],
    username: AsOpt,
    set_: SetOpt = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Start a run of an SOP; the parameters are checked before anything runs."""
    from flows import service

    values = _pairs(set_)
    res = _run(service.start_run, _settings(), institution, sop_id, values, username, _password(username, password_env))
    out.print(
        f"started run {res.run_id} ({res.sop_id} v{res.sop_version}, sha256 {res.sop_sha256[:12]}; flow run {res.flow_run_id})"
    )


@app.command("submit")
def submit(
    run_id: str,
    step_id: str,
    username: AsOpt,
    set_: SetOpt = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="A JSON file of field values.")] = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
    preview: Annotated[bool, typer.Option("--preview", help="Show the computed values; sign nothing.")] = False,
) -> None:
    """Enter a step's data and sign it (re-authenticates with your password)."""
    from flows import service

    values: dict[str, Any] = {}
    if json_file is not None:
        try:
            loaded = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{json_file}: {exc}", param_hint="--json") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter(f"{json_file}: expected a JSON object of field values", param_hint="--json")
        values.update(loaded)
    values.update(_pairs(set_))
    if preview:
        shown = _run(service.preview_step, _settings(), run_id, step_id, values)
        for name, value in shown["computed"].items():
            out.print(f"{name} = {escape(str(value))}  (computed)")
        out.print("nothing signed: run it again without --preview to sign these values")
        return
    res = _run(service.submit_step, _settings(), run_id, step_id, username, _password(username, password_env), values)
    for name, value in res.computed.items():
        out.print(f"{name} = {escape(str(value))}  (computed, signed)")
    tail = "the run goes on" if res.resumed else "the executor will resume the run"
    out.print(
        f"signed {res.step_id} of run {res.run_id[:8]}: signature {res.signature_id} (sha256 {res.signed_sha256[:12]}); {tail}"
    )


@app.command("runs")
def runs() -> None:
    """List runs, newest first, with their status and what each waits on."""
    from flows import service

    rows = _run(service.list_runs, _settings())
    if not rows:
        out.print("no runs yet: `sopflow start` starts one, `sopflow demo` shows one")
    for r in rows:
        waits = f" waiting on {', '.join(r['waiting_on'])}" if r["waiting_on"] else ""
        for o in r.get("overdue", []):
            waits += f" [yellow]({o['step_id']} overdue since {o['since']:%Y-%m-%d %H:%M} UTC)[/yellow]"
        detail = f" ({r['detail']})" if r["detail"] and r["status"] != "waiting" else ""
        out.print(
            f"{r['id']}  {r['institution']}/{r['sop_id']} v{r['sop_version']}  {r['status']}{escape(detail)}{waits}  "
            f"started {r['started_at']:%Y-%m-%d %H:%M} UTC"
        )


@app.command("inbox")
def inbox(username: AsOpt) -> None:
    """Steps waiting on your roles, oldest first."""
    from flows import service

    items = _run(service.inbox, _settings(), username)
    if not items:
        out.print(f"nothing waits on {username}")
    for it in items:
        note = (
            f"  [yellow](you may not sign this one: {escape(it['cannot_sign'])})[/yellow]" if it["cannot_sign"] else ""
        )
        if it.get("overdue_since"):
            note += f"  [yellow]overdue since {it['overdue_since']:%Y-%m-%d %H:%M} UTC[/yellow]"
        if it.get("due_at"):
            note += f"  due {it['due_at'][:16].replace('T', ' ')} UTC"
        out.print(
            f"{it['run_id']}  {it['sop_id']}/{it['step_id']}  role {it['role']}  since {it['since']:%Y-%m-%d %H:%M} UTC  "
            f"{escape(it['title'])}{note}"
        )
        for d in it.get("deadlines", []):
            from flows.cli.render import deadline_text

            out.print(f"    [yellow]deadline {escape(d['title'])}: {deadline_text(d)}[/yellow]")
        for name, f in it["fields"].items():
            if f.get("compute"):
                out.print(f"    {name} is computed: {escape(f['compute'])}")
                continue
            limits = " ".join(f"{k}={v}" for k, v in f.items() if k in ("unit", "min", "max", "choices", "pattern"))
            out.print(f"    --set {name}=…  ({f['type']}{', ' + escape(limits) if limits else ''})")


@app.command("record")
def record(
    run_id: str, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable export.")] = False
) -> None:
    """Print the quality record of a run: every step, value, signer, check, deviation, document."""
    from flows import service
    from flows.cli.render import print_record

    rec = _run(service.quality_record, _settings(), run_id)
    if as_json:
        sys.stdout.write(json.dumps(rec, indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        print_record(out, rec)


@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit chain and every record row; exit 1 and name the first break."""
    from flows import service

    report = _run(service.verify_audit, _settings())
    if report.ok:
        out.print(f"audit verify: OK ({report.events} events, {report.rows} record rows)")
        return
    for p in report.problems:
        err.print(f"[red]audit verify: {escape(p)}[/red]")
    raise typer.Exit(1)


@app.command("web")
def web(
    host: Annotated[str, typer.Option(help="Address to listen on (behind a TLS proxy in production).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the web app: inbox, step forms and signing, runs, documents, SOPs (English and 中文)."""
    import uvicorn

    from flows.web import create_app

    settings = _settings()
    app_ = _run(create_app, settings)
    out.print(f"sopflow web on http://{host}:{port} (data under {settings.home}); Ctrl-C stops it")
    # One process: sessions live in its memory (flows.web.sessions). proxy_headers: a TLS proxy's
    # X-Forwarded-Proto makes the session cookie Secure.
    uvicorn.run(app_, host=host, port=port, proxy_headers=True, log_level="warning")


@app.command("demo")
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Leave the server and executor running afterwards.")] = False,
) -> None:
    """Run the dose-receipt demo end to end: one accepted dose, one with a failed temperature check."""
    from flows.demo import run_demo

    code = _run(run_demo, _settings(), out, keep=keep)
    raise typer.Exit(code)


def main() -> None:
    app()
