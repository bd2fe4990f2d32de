"""Edge of the data path: ``sopflow correct`` and ``sopflow audit verify-export``, thin over ``flows.services.signing`` and ``flows.record.export``.

    sopflow correct RUN STEP --as USER --set k=v … --reason "…"   correct a signed entry (re-signs)
    sopflow audit verify-export FILE [--key KEY]                   check an exported record offline

``flows.cli`` mounts both. ``verify-export`` runs ``flows.record.export`` (through ``flows.services.audit``), the stdlib-only checker
an inspector can copy and run alone (``python export.py FILE``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["correct", "verify_export"]


def correct(
    run_id: str,
    step_id: str,
    username: Annotated[str, typer.Option("--as", help="Your sopflow user name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why the signed entry was wrong (required).")] = "",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="A corrected value as key=value (repeatable).")
    ] = None,
    password_env: Annotated[
        str, typer.Option("--password-env", help="Read the password from this environment variable when it is set.")
    ] = "SOPFLOW_PASSWORD",
) -> None:
    """Correct a done step with a new signed entry and a reason; the original stays in the record."""
    from flows.services import signing

    values = cli.pairs(set_)
    res = cli.run(
        signing.correct_step,
        cli.settings(),
        run_id,
        step_id,
        username,
        cli.password(username, password_env),
        values,
        reason,
    )
    changed = "; ".join(f"{k}: {v['old']!r} → {v['new']!r}" for k, v in res.changes.items())
    cli.out.print(
        f"corrected {res.step_id} of run {res.run_id[:8]} ({escape(changed)}): signature {res.signature_id} "
        f"(sha256 {res.signed_sha256[:12]}); the original entry stays in the record. Checks that already ran "
        "are not re-run."
    )


def verify_export(
    file: Annotated[Path, typer.Argument(help="A record exported with `sopflow record RUN --json`.")],
    key: Annotated[
        str | None,
        typer.Option(
            "--key", help="The installation's public key (as `sopflow audit key` prints it) or a file of keys."
        ),
    ] = None,
) -> None:
    """Check an exported record offline: event hashes, rows against their events, signature hashes, its signed checkpoint."""
    from flows.services.audit import verify_export as check

    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        cli.err.print(f"[red]error:[/red] {escape(f'{file}: {exc}')}")
        raise typer.Exit(1) from None
    keys_text = None
    if key is not None:
        try:
            keys_text = Path(key).read_text(encoding="utf-8") if Path(key).is_file() else key
        except OSError as exc:
            cli.err.print(f"[red]error:[/red] {escape(f'--key {key}: {exc.strerror}')}")
            raise typer.Exit(1) from None
    problems = cli.run(check, doc, keys_text)
    if not problems:
        cp = doc.get("checkpoint")
        signed = (
            f"; checkpoint {cp['n']} (event {cp['seq']}) signed by key {cp['key_id']}"
            + ("" if key is not None else " (unconfirmed: pass --key with the installation's public key)")
            if isinstance(cp, dict)
            else "; no signed checkpoint"
        )
        cli.out.print(
            f"verify-export: OK ({len(doc['audit_events'])} audit events, "
            f"{sum(len(v) for v in doc['rows'].values())} rows, run {doc['run']['id']}{signed})"
        )
        return
    cli.err.print(f"[red]verify-export: {escape(problems[0])}[/red]")
    for p in problems[1:]:
        cli.err.print(f"  also: {escape(p)}")
    raise typer.Exit(1)
