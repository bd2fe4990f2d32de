"""Edge of the data path: ``sopflow deviations`` and ``sopflow chain``, thin over ``flows.services.runs``.

    sopflow deviations [--all] [--json]     open deviations with their lifecycle, and overdue CAPAs
    sopflow deviation raise (--run ID | --coi COI) --class C --reason TEXT [--quarantine] --as USER
                                            raise a deviation by hand on a run or a dose (signed in, audited)
    sopflow chain COI [--json]              every run that touched one dose, in order; is the chain unbroken?

``flows.cli`` mounts them (``deviation_app`` as ``sopflow deviation``).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["chain", "deviation_app", "deviations", "raise_deviation"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def deviations(
    show_all: Annotated[bool, typer.Option("--all", help="Closed deviations too.")] = False,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Judge CAPAs overdue as of this ISO time (default: now).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Open deviations (oldest first) with their lifecycle, and every overdue CAPA action."""
    from datetime import UTC, datetime

    from flows.services import runs

    try:
        now = datetime.fromisoformat(as_of) if as_of else None
        if now is not None and now.tzinfo is None:
            now = now.replace(tzinfo=UTC)  # --as-of without an offset is read as UTC, as the listing prints
    except ValueError:
        raise typer.BadParameter(f"expected an ISO date and time, got {as_of!r}", param_hint="--as-of") from None
    res = cli.run(runs.deviations, cli.settings(), now=now, include_closed=show_all)
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, ensure_ascii=False, default=str) + "\n")
        return
    out = cli.out
    if not res["deviations"]:
        out.print("no open deviations")
    for d in res["deviations"]:
        q = "  [red]QUARANTINED[/red]" if d["quarantined"] else ""
        decision = f" ({d['decision']})" if d["decision"] else ""
        out.print(
            f"{d['id']}  {d['classification']}  {d['status']}{decision}{q}  COI {d['coi'] or '-'}  "
            f"run {d['run_id'][:8]} {d['sop_id']}/{d['step_id']}  opened {d['opened_at'][:16]} UTC"
        )
        out.print(f"    {escape(d['description'])}")
        if d["events"]:
            out.print("    lifecycle: " + ", ".join(f"{e['kind']} {e['at'][:16]}" for e in d["events"]))
    for c in res["overdue_capas"]:
        out.print(
            f"[yellow]overdue CAPA[/yellow]  deviation {c['deviation_id']}  owner {c['owner']}  due {c['due']}  "
            f"{escape(str(c['action']))}"
        )


deviation_app = typer.Typer(help="Deviations raised by hand (`sopflow deviations` lists them).", no_args_is_help=True)


@deviation_app.command("raise")
def raise_deviation(
    username: cli.AsOpt,
    classification: Annotated[str, typer.Option("--class", help="minor, major or critical.")],
    reason: Annotated[str, typer.Option("--reason", help="What happened, where and when.")],
    run_id: Annotated[str | None, typer.Option("--run", help="The run it is about (an id or a unique prefix).")] = None,
    coi: Annotated[
        str | None, typer.Option("--coi", help="Or the dose it is about: its newest run carries it.")
    ] = None,
    quarantine: Annotated[bool, typer.Option("--quarantine", help="Quarantine the dose (role qa).")] = False,
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
    as_json: JsonOpt = False,
) -> None:
    """Raise a deviation by hand on a run or a dose (re-authenticates with your password; audited).

    A major or critical one holds the run's completion until QA signs its disposition."""
    from flows.services import deviations as deviation_service

    if (run_id is None) == (coi is None):
        raise typer.BadParameter("name the run (--run ID) or the dose (--coi COI), one of them", param_hint="--run")
    res = cli.run(
        deviation_service.raise_deviation,
        cli.settings(),
        username=username,
        password=cli.password(username, password_env),
        classification=classification.strip().lower(),
        description=reason,
        run_id=run_id,
        coi=coi,
        quarantine=quarantine,
    )
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, ensure_ascii=False, default=str) + "\n")
        return
    cli.out.print(
        f"deviation {res['deviation_id']} raised on run {res['run_id'][:8]} ({classification}); recorded and audited"
    )
    if res["handling_run_id"]:
        cli.out.print(
            f"its handling run {res['handling_run_id']} has started: containment, investigation, disposition, CAPA"
        )
    elif res["handling_problem"]:
        cli.out.print(f"[yellow]{escape(res['handling_problem'])}[/yellow]")
    if classification.strip().lower() in ("major", "critical"):
        cli.out.print("the run cannot complete, nor release its dose, until the deviation's disposition is signed")


def chain(coi: str, as_json: JsonOpt = False) -> None:
    """Every run that touched one dose (COI), in order, with sub-runs and deviations; exit 1 when the chain is broken."""
    from flows.services import runs

    res = cli.run(runs.chain_of_identity, cli.settings(), coi)
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, ensure_ascii=False, default=str) + "\n")
    else:
        out = cli.out
        for r in res["runs"]:
            stage = escape(f"[{r['stage']}{'?' if r['stage_guessed'] else ''}] ") if r["stage"] else ""
            out.print(
                f"{'    ' * r['depth']}{r['started_at'][:16]}  {stage}{r['sop_id']} v{r['sop_version']}  "
                f"{r['run_id']}  {r['status']}"
            )
            for d in r["deviations"]:
                out.print(
                    f"{'    ' * r['depth']}    deviation {d['id']}  {d['classification']}  {d['status']}"
                    f"{'  QUARANTINED' if d['quarantined'] else ''}"
                )
        if res["unbroken"]:
            out.print(f"[green]chain of identity for {escape(res['coi'])}: unbroken[/green]")
        else:
            for p in res["problems"]:
                cli.err.print(f"[red]chain broken:[/red] {escape(p)}")
    if not res["unbroken"]:
        raise typer.Exit(1)
