"""Edge of the data path: the run commands, thin over ``flows.services``.

    sopflow start SOP_ID --institution I --set k=v --as USER      start a run
    sopflow submit RUN STEP --as USER --set k=v [--json FILE]     enter data and sign a step
    sopflow runs [--status S --sop ID --product P --coi C --since DAY --until DAY --page N] [--json]
                                          runs, newest first, a page at a time, with what each waits on
    sopflow inbox --as USER [--json]      steps waiting on that user's roles (signs USER in)
    sopflow record RUN --as USER [--json] the quality record of a run (a user of its institution)
    sopflow audit verify [--against FILE] [--incremental]  the chain, rows, signatures, signed checkpoints
    sopflow audit key [--create]          the public key that verifies the signed checkpoints
    sopflow audit checkpoint [--out FILE] sign a checkpoint of the head now

``flows.cli`` mounts ``runs_app``'s commands at the top and ``audit_app`` as ``sopflow audit``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["audit_app", "runs_app"]

runs_app = typer.Typer()
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)


@runs_app.command("start")
def start(
    sop_id: str,
    institution: Annotated[str, typer.Option(help="Institution id (folder under sops/).")],
    username: cli.AsOpt,
    set_: cli.SetOpt = None,
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Start a run of an SOP; the parameters are checked before anything runs."""
    from flows.services import runs

    values = cli.pairs(set_)
    res = cli.run(
        runs.start_run, cli.settings(), institution, sop_id, values, username, cli.password(username, password_env)
    )
    cli.out.print(
        f"started run {res.run_id} ({res.sop_id} v{res.sop_version}, sha256 {res.sop_sha256[:12]}; flow run {res.flow_run_id})"
    )


@runs_app.command("submit")
def submit(
    run_id: str,
    step_id: str,
    username: cli.AsOpt,
    set_: cli.SetOpt = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="A JSON file of field values.")] = None,
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
    preview: Annotated[bool, typer.Option("--preview", help="Show the computed values; sign nothing.")] = False,
) -> None:
    """Enter a step's data and sign it (re-authenticates with your password)."""
    from flows.services import signing

    values: dict[str, Any] = {}
    if json_file is not None:
        try:
            loaded = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{json_file}: {exc}", param_hint="--json") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter(f"{json_file}: expected a JSON object of field values", param_hint="--json")
        values.update(loaded)
    values.update(cli.pairs(set_))
    if preview:
        shown = cli.run(signing.preview_step, cli.settings(), run_id, step_id, values)
        for name, value in shown["computed"].items():
            cli.out.print(f"{name} = {escape(str(value))}  (computed)")
        cli.out.print("nothing signed: run it again without --preview to sign these values")
        return
    res = cli.run(
        signing.submit_step, cli.settings(), run_id, step_id, username, cli.password(username, password_env), values
    )
    for name, value in res.computed.items():
        cli.out.print(f"{name} = {escape(str(value))}  (computed, signed)")
    tail = "the run goes on" if res.resumed else "the executor will resume the run"
    cli.out.print(
        f"signed {res.step_id} of run {res.run_id[:8]}: signature {res.signature_id} (sha256 {res.signed_sha256[:12]}); {tail}"
    )


@runs_app.command("runs")
def list_runs(
    as_json: cli.JsonOpt = False,
    status: Annotated[
        str | None, typer.Option(help="Only runs with this status (waiting, completed, …) or 'open' (not yet ended).")
    ] = None,
    sop: Annotated[str | None, typer.Option(help="Only runs of this SOP id.")] = None,
    product: Annotated[str | None, typer.Option(help="Only runs of this product (its catalogue id).")] = None,
    coi: Annotated[str | None, typer.Option(help="Only runs of this dose (chain-of-identity id).")] = None,
    since: Annotated[str | None, typer.Option(help="Only runs started on or after this UTC day (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(help="Only runs started on or before this UTC day (YYYY-MM-DD).")] = None,
    page: Annotated[int, typer.Option(help="Which page (newest first).")] = 1,
    per_page: Annotated[int, typer.Option(help="Runs per page (at most 500).")] = 50,
) -> None:
    """List runs, newest first, a page at a time, with their status and what each waits on (no parameters:
    `record` shows them)."""
    from flows.services import runs

    filters = cli.run(
        runs.run_filter,
        status=status,
        sop_id=sop,
        product=product,
        coi=coi,
        since=since,
        until=until,
        page=page,
        per_page=per_page,
    )
    shown = cli.run(runs.runs_page, cli.settings(), filters)
    rows = shown["runs"]
    if as_json:
        cli.emit_json(rows)
        return
    if not rows:
        filtered = any(v is not None for v in (status, sop, product, coi, since, until)) or page > 1
        cli.out.print(
            "no runs match" if filtered else "no runs yet: `sopflow start` starts one, `sopflow demo` shows one"
        )
    for r in rows:
        waits = f" waiting on {', '.join(r['waiting_on'])}" if r["waiting_on"] else ""
        for o in r.get("overdue", []):
            waits += f" [yellow]({o['step_id']} overdue since {o['since']:%Y-%m-%d %H:%M} UTC)[/yellow]"
        # A waiting run's detail is the step it waits on, unless it is held (a quarantine, an open deviation): then why.
        held = r["detail"] and ": held: " in r["detail"]
        detail = f" ({r['detail']})" if r["detail"] and (r["status"] != "waiting" or held) else ""
        cli.out.print(
            f"{r['id']}  {r['institution']}/{r['sop_id']} v{r['sop_version']}  {r['status']}{escape(detail)}{waits}  "
            f"started {r['started_at']:%Y-%m-%d %H:%M} UTC"
        )
    if shown["more"]:
        cli.out.print(f"more: `sopflow runs --page {page + 1}` (with the same filters) shows the next {per_page}")


@runs_app.command("inbox")
def inbox_cmd(
    username: cli.AsOpt, as_json: cli.JsonOpt = False, password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD"
) -> None:
    """Steps waiting on your roles, oldest first (you sign in: the items carry the runs' parameters)."""
    from flows.cli.render import deadline_text
    from flows.services import reads

    items = cli.run(reads.inbox_for, cli.settings(), username, cli.password(username, password_env))
    if as_json:
        cli.emit_json(items)
        return
    if not items:
        cli.out.print(f"nothing waits on {username}")
    for it in items:
        note = (
            f"  [yellow](you may not sign this one: {escape(it['cannot_sign'])})[/yellow]" if it["cannot_sign"] else ""
        )
        if it.get("overdue_since"):
            note += f"  [yellow]overdue since {it['overdue_since']:%Y-%m-%d %H:%M} UTC[/yellow]"
        if it.get("due_at"):
            note += f"  due {it['due_at'][:16].replace('T', ' ')} UTC"
        cli.out.print(
            f"{it['run_id']}  {it['sop_id']}/{it['step_id']}  role {it['role']}  since {it['since']:%Y-%m-%d %H:%M} UTC  "
            f"{escape(it['title'])}{note}"
        )
        for d in it.get("deadlines", []):
            cli.out.print(f"    [yellow]deadline {escape(d['title'])}: {deadline_text(d)}[/yellow]")
        for name, f in it["fields"].items():
            if f.get("compute"):
                cli.out.print(f"    {name} is computed: {escape(f['compute'])}")
                continue
            limits = " ".join(f"{k}={v}" for k, v in f.items() if k in ("unit", "min", "max", "choices", "pattern"))
            cli.out.print(f"    --set {name}=…  ({f['type']}{', ' + escape(limits) if limits else ''})")


@runs_app.command("record")
def record(
    run_id: str,
    username: cli.AsOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable export.")] = False,
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Print the quality record of a run: every step, value, signer, check, deviation, document (--as a user of its institution)."""
    from flows.cli.render import print_record
    from flows.services import reads

    rec = cli.run(reads.record_for, cli.settings(), username, cli.password(username, password_env), run_id)
    if as_json:
        sys.stdout.write(json.dumps(rec, indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        print_record(cli.out, rec)


@audit_app.command("verify")
def audit_verify(
    against: Annotated[
        Path | None,
        typer.Option(
            "--against", help="A document (HTML), an export (JSON) or a saved checkpoint the chain must still hold."
        ),
    ] = None,
    incremental: Annotated[
        bool, typer.Option("--incremental", help="Start from the newest checkpoint verified here before.")
    ] = False,
) -> None:
    """Walk the audit chain, every record row and signature, and every signed checkpoint; exit 1 and name each break."""
    from flows.services.audit import read_kept, verify_audit

    settings = cli.settings()
    kept = cli.run(read_kept, against) if against is not None else None
    if cli.err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("audit verify: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=cli.err,
            transient=True,
        ) as bar:
            task = bar.add_task("events", total=None)

            def progress(phase: str, done: int, total: int) -> None:
                bar.update(task, description=phase, completed=done, total=total or None)

            report = cli.run(verify_audit, settings, incremental=incremental, against=kept, progress=progress)
    else:
        report = cli.run(verify_audit, settings, incremental=incremental, against=kept)
    for note in report.notes:
        cli.out.print(f"audit verify: note: {escape(note)}")
    if report.ok:
        walked = (
            f"events {report.start + 1} to {report.head[0]}"
            if report.start and report.head
            else f"{report.events} events"
        )
        held = f"; holds {escape(str(against))}'s checkpoint" if against is not None else ""
        cli.out.print(
            f"audit verify: OK ({walked}, {report.rows} record rows, {report.signatures} signatures, "
            f"{report.checkpoints} signed checkpoint{'' if report.checkpoints == 1 else 's'}{held})"
        )
        return
    for p in report.problems:
        cli.err.print(f"[red]audit verify: {escape(p)}[/red]")
    if report.full:
        cli.err.print(f"[red]audit verify: stopped after {report.limit} problems[/red]")
    raise typer.Exit(1)


@audit_app.command("key")
def audit_key(
    create: Annotated[bool, typer.Option("--create", help="Make the key file (mode 600) if there is none.")] = False,
) -> None:
    """Print the public key that verifies the audit chain's signed checkpoints (give it to inspectors)."""
    from flows.services.audit import audit_key as key_of

    res = cli.run(key_of, cli.settings(), create=create)
    sys.stdout.write(res["public_key"] + "\n")
    cli.err.print(
        f"key {res['key_id']} ({escape(res['key_file'])}); every key known here, old ones included: "
        f"{escape(res['public_keys_file'])} ({len(res['known'])})"
    )


@audit_app.command("checkpoint")
def audit_checkpoint(
    out_file: Annotated[Path | None, typer.Option("--out", help="Save the checkpoint (JSON) to this file.")] = None,
) -> None:
    """Sign a checkpoint of the chain's head now (unless one covers it) and print or save it."""
    from flows.services.audit import make_checkpoint

    cp = cli.run(make_checkpoint, cli.settings())
    if cp is None:
        cli.err.print("[red]audit checkpoint: the audit chain is empty; nothing to sign[/red]")
        raise typer.Exit(1)
    text = json.dumps(cp, indent=2) + "\n"
    if out_file is None:
        sys.stdout.write(text)
        return
    try:
        out_file.write_text(text, encoding="utf-8")
    except OSError as exc:
        cli.err.print(f"[red]error:[/red] {escape(f'{out_file}: {exc.strerror}')}")
        raise typer.Exit(1) from None
    cli.out.print(f"checkpoint {cp['n']} (event {cp['seq']}) saved to {escape(str(out_file))}")
