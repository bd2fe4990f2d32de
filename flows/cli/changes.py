"""Edge of the data path: ``sopflow sop …`` commands of SOP change control, thin over ``flows.services.versions``
and ``flows.services.transfer``.

    sopflow sop establish INST --as QA                   the SOP files become the first Effective versions
    sopflow sop draft PATH --institution I --as ADMIN    a validated YAML file becomes a Draft
    sopflow sop submit ID VERSION -i I --reviewer U --reason R --as ADMIN   start change control on a Draft
    sopflow sop versions [ID] -i I                       versions with their states and signed history
    sopflow sop diff ID V1 V2 -i I                       what changed, as an administrator reads it
    sopflow sop review ID -i I --note N --as QA          a periodic review that found no change
    sopflow sop retire ID -i I --reason R --as QA        withdraw an SOP from use
    sopflow sop export INST FOLDER / import FOLDER --as ADMIN   move Effective SOPs between installations
    sopflow training overdue [-i I]                      training due on issued versions and not recorded

``flows.cli`` mounts these on its ``sop`` and ``training`` sub-apps. Imports stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["register"]

AsOpt = Annotated[str, typer.Option("--as", help="Your sopflow user name.")]
InstOpt = Annotated[str, typer.Option("--institution", "-i", help="Institution id.")]
PasswordEnv = Annotated[
    str, typer.Option("--password-env", help="Read your password from this environment variable when it is set.")
]


def establish(
    institution: Annotated[str, typer.Argument(help="Institution id (folder under sops/).")],
    username: AsOpt,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Make the institution's SOP files its first Effective versions, signed "initial issue" by a QA officer (once)."""
    from flows.services.versions import establish as run_establish

    rows = cli.run(run_establish, cli.settings(), institution, cli.officer(username, password_env))
    for r in rows:
        if r.get("skipped"):
            cli.out.print(f"[yellow]not established: {r['sop_id']}: {escape(r['skipped'])}[/yellow]")
            continue
        cli.out.print(f"established {institution}/{r['sop_id']} v{r['version']} (sha256 {r['sha256'][:12]}): effective")


def draft(
    path: Annotated[Path, typer.Argument(help="The SOP YAML file; its name is the SOP id.")],
    institution: InstOpt,
    username: AsOpt,
    reason: Annotated[str | None, typer.Option("--reason", help="What the draft changes.")] = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Store a YAML file, validated as `sopflow sop validate` does, as a new Draft (SOP administrators only)."""
    from flows.services.drafts import create_draft
    from flows.sop.load import display_path

    try:
        text = path.read_bytes().decode("utf-8")  # exactly the file's bytes: the sha256 is theirs
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="PATH") from None
    res = cli.run(
        create_draft,
        cli.settings(),
        institution,
        text,
        name=display_path(path),
        username=username,
        password=cli.password(username, password_env),
        reason=reason,
    )
    cli.out.print(
        f"draft {institution}/{res['sop_id']} v{res['version']} stored (sha256 {res['sha256'][:12]}); "
        f"`sopflow sop submit {res['sop_id']} {res['version']} -i {institution} --reviewer USER --reason …` "
        "puts it under change control"
    )


def submit(
    sop_id: str,
    version: int,
    institution: InstOpt,
    username: AsOpt,
    reviewer: Annotated[str, typer.Option("--reviewer", help="The named reviewer (role sop_reviewer).")],
    reason: Annotated[str, typer.Option("--reason", help="The reason for change.")],
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Start the built-in change-control SOP on a Draft and sign its submission with the reason for change."""
    from flows.services.drafts import submit_change

    run_id = cli.run(
        submit_change,
        cli.settings(),
        institution,
        sop_id,
        version,
        reviewer=reviewer,
        reason=reason,
        username=username,
        password=cli.password(username, password_env),
    )
    cli.out.print(
        f"{sop_id} v{version} is in review: change-control run {run_id}; waits on {reviewer} (review), then QA"
    )


def versions(
    sop_id: Annotated[str | None, typer.Argument(help="One SOP [default: all].")] = None,
    institution: InstOpt = "demo_hospital",
    as_json: cli.JsonOpt = False,
) -> None:
    """List SOP versions with their state and their signed history."""
    from flows.services.versions import list_versions

    rows = cli.run(list_versions, cli.settings(), institution, sop_id)
    if as_json:
        cli.emit_json(rows)
        return
    if not rows:
        cli.out.print(f"no SOP versions at {institution}: `sopflow sop establish {institution} --as <QA officer>`")
    for r in rows:
        extra = "".join(
            f"  {k.replace('_', ' ')} {str(r['data'][k])[:16]}"
            for k in ("effective_at", "training_due", "review_due")
            if r["data"].get(k)
        )
        cli.out.print(f"[bold]{r['sop_id']} v{r['version']}[/bold]  {r['state']}{extra}  sha256 {r['sha256'][:12]}")
        if r["coverage"]:
            roles = ", ".join(f"{c['role']}: {c['trained']}/{c['needed']}" for c in r["coverage"])
            cli.out.print(f"    trained (role: trained/needed): {roles}")
        if r["waiting"]:
            cli.out.print(f"    [yellow]{escape(r['waiting'])}[/yellow]")
        for h in r["history"]:
            signed = f" signed by {h['printed_name']} ({h['meaning']})" if h["meaning"] else f" by {h['by']}"
            why = f": {escape(h['reason'])}" if h["reason"] else ""
            if h["data"].get("run_id"):  # the change-control run: its quality record is the approval history
                why += f"  (change-control run {h['data']['run_id']}; `sopflow record` shows it)"
            cli.out.print(f"    {h['at']:%Y-%m-%d %H:%M} UTC  {h['state']}{escape(signed)}{why}")


def diff(sop_id: str, old: int, new: int, institution: InstOpt = "demo_hospital") -> None:
    """What changed between two versions: steps added, removed, moved; roles, fields, limits, checks (old → new)."""
    from flows.services.transfer import diff_versions

    changes = cli.run(diff_versions, cli.settings(), institution, sop_id, old, new)
    cli.out.print(f"{institution}/{sop_id} v{old} → v{new}: {len(changes)} change{'s' if len(changes) != 1 else ''}")
    for c in changes:
        cli.out.print(f"  {escape(str(c))}")


def review(
    sop_id: str,
    institution: InstOpt,
    username: AsOpt,
    note: Annotated[str, typer.Option("--note", help="What the review found.")],
    months: Annotated[
        int | None, typer.Option("--months", help="Next review in this many months [default 24].")
    ] = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Record, signed by a QA officer, a periodic review that found no change; sets the next review date."""
    from flows.services.versions import record_review

    res = cli.run(
        record_review,
        cli.settings(),
        institution,
        sop_id,
        cli.officer(username, password_env),
        note=note,
        months=months,
    )
    cli.out.print(f"{sop_id} v{res['version']} reviewed, no change; next review due {res['review_due'][:10]}")


def retire(
    sop_id: str,
    institution: InstOpt,
    username: AsOpt,
    reason: Annotated[str, typer.Option("--reason", help="Why it is withdrawn.")],
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Withdraw an SOP from use: its Effective version turns Retired (signed by a QA officer)."""
    from flows.services.versions import retire as run_retire

    res = cli.run(run_retire, cli.settings(), institution, sop_id, cli.officer(username, password_env), reason=reason)
    cli.out.print(f"{sop_id} v{res['version']} retired: no new run may start on it")


def export(
    institution: Annotated[str, typer.Argument(help="Institution id.")],
    folder: Annotated[Path, typer.Argument(help="An empty or new folder to write.")],
) -> None:
    """Write the institution's Effective SOPs, product catalogue and roles as YAML with a manifest of sha256s."""
    from flows.services.transfer import export_institution

    manifest = cli.run(export_institution, cli.settings(), institution, folder)
    cli.out.print(f"exported {len(manifest['files'])} files of {institution} to {folder} (manifest.json)")


def import_(
    folder: Annotated[Path, typer.Argument(help="A folder written by `sopflow sop export`.")],
    username: AsOpt,
    institution: Annotated[
        str | None,
        typer.Option("--institution", "-i", help="Import into this institution [default: the exported one]."),
    ] = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Check an exported folder against its manifest and store its SOPs as Drafts (change control follows)."""
    from flows.services.transfer import import_institution

    res = cli.run(
        import_institution,
        cli.settings(),
        folder,
        username=username,
        password=cli.password(username, password_env),
        institution=institution,
    )
    for d in res["drafts"]:
        cli.out.print(f"draft {res['institution']}/{d['sop_id']} v{d['version']} stored (sha256 {d['sha256'][:12]})")
    for note in res["notes"]:
        cli.out.print(f"[yellow]{escape(note)}[/yellow]")


def training_overdue(
    institution: Annotated[str | None, typer.Option("--institution", "-i", help="Only this institution.")] = None,
    as_json: cli.JsonOpt = False,
) -> None:
    """Training assigned when a version was issued, past its due date and not yet recorded; and, per
    Issued or Effective version, how many trained people each role that signs in it has (trained/needed)."""
    from flows.services.training import coverage_rows, overdue_training

    rows = cli.run(overdue_training, cli.settings(), institution=institution)
    cover = cli.run(coverage_rows, cli.settings(), institution)
    if as_json:
        cli.emit_json({"overdue": rows, "coverage": cover})
        return
    if not rows:
        cli.out.print("no overdue training")
    for r in rows:
        cli.out.print(
            f"{r['username']}  {r['institution']}/{r['sop_id']} v{r['sop_version']}  due {r['due_at']:%Y-%m-%d %H:%M} UTC "
            f"({r['overdue_days']} days overdue; roles {', '.join(r['roles'])})"
        )
    versions: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for c in cover:
        versions.setdefault((c["institution"], c["sop_id"], c["sop_version"], c["state"]), []).append(c)
    if versions:
        cli.out.print("coverage (role: trained/needed):")
    for (inst, sop_id, number, state), roles in versions.items():
        line = ", ".join(
            f"[red]{c['role']}: {c['trained']}/{c['needed']}[/red]"
            if c["short"]
            else f"{c['role']}: {c['trained']}/{c['needed']}"
            for c in roles
        )
        cli.out.print(f"  {inst}/{sop_id} v{number} ({state})  {line}")
        if roles[0]["waiting"]:
            cli.out.print(f"    [yellow]{escape(roles[0]['waiting'])}[/yellow]")


def register(sop_app: typer.Typer, training_app: typer.Typer) -> None:
    """Mount the commands on ``sopflow sop`` and ``sopflow training``."""
    for name, fn in (
        ("establish", establish),
        ("draft", draft),
        ("submit", submit),
        ("versions", versions),
        ("diff", diff),
        ("review", review),
        ("retire", retire),
        ("export", export),
        ("import", import_),
    ):
        sop_app.command(name)(fn)
    training_app.command("overdue")(training_overdue)
