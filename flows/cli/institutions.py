"""Edge of the data path: setting up an installation and its institutions, thin over
``flows.services.institutions`` and ``flows.services.roles``.

    sopflow init DIR --name N [--timezone Z] [--language en|zh] [--from EXAMPLE]   scaffold an institution folder
    sopflow admin init                                  create the installation administrator's key
    sopflow institution add INST --qa USER [--name N]   set up an institution with its first QA officer (admin)
    sopflow institution list [--json]                   institution folders, their staff and state
    sopflow user grant USER --role INST:ROLE --as QA    give a role (a QA officer of INST)
    sopflow user revoke USER --role INST:ROLE --as QA --reason R   withdraw it (an append-only row)

``flows.cli`` mounts ``admin_app`` and ``institution_app`` and registers the rest (``register``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["admin_app", "init", "institution_app", "register"]

admin_app = typer.Typer(help="The installation administrator (sets up institutions).", no_args_is_help=True)
institution_app = typer.Typer(help="Institutions: set one up, list them.", no_args_is_help=True)
RoleOpt = Annotated[str, typer.Option("--role", help="INSTITUTION:ROLE.")]


def init(
    folder: Annotated[Path, typer.Argument(help="The new institution folder; its name is the institution id.")],
    name: Annotated[str, typer.Option("--name", help="The institution's name, printed on its documents.")],
    timezone: Annotated[str | None, typer.Option("--timezone", help="IANA time zone [default: the example's].")] = None,
    language: Annotated[str, typer.Option("--language", help="Documents' language: en or zh.")] = "en",
    source: Annotated[
        str | None, typer.Option("--from", help="Built-in example to start from [default: by language].")
    ] = None,
) -> None:
    """Scaffold an institution folder (institution, products, the day-one SOPs) that validates."""
    from flows.services.institutions import scaffold_institution

    res = cli.run(
        scaffold_institution, cli.settings(), folder, name=name, timezone=timezone, language=language, source=source
    )
    cli.out.print(f"wrote {res['folder']}: {', '.join(res['files'])}")
    cli.out.print(
        f"{len(res['sops'])} SOPs validate. Review every file (owner, approval, roles, products) before "
        f"`sopflow sop establish {res['institution']}`; point SOPFLOW_SOPS_DIR at {Path(res['folder']).parent}"
    )


@admin_app.command("init")
def admin_init() -> None:
    """Create the installation administrator's key file (mode 600) and register its sha256, once."""
    from flows.services.institutions import init_admin_key

    path = cli.run(init_admin_key, cli.settings())
    cli.out.print(f"installation administrator's key written to {path} (keep it readable by this OS user only)")


@institution_app.command("add")
def institution_add(
    institution: str,
    qa: Annotated[str, typer.Option("--qa", help="User name of the institution's first QA officer.")],
    name: Annotated[str | None, typer.Option("--name", help="Printed name, when the account is new.")] = None,
    password_env: Annotated[
        str, typer.Option("--password-env", help="Read the new account's password from this variable.")
    ] = "SOPFLOW_NEW_PASSWORD",
) -> None:
    """Set up an institution with its first QA officer (the installation administrator, by key file)."""
    from flows.services.institutions import add_institution

    settings = cli.settings()
    password = cli.new_password(qa, password_env) if name else None
    res = cli.run(add_institution, settings, institution, qa, name, password)
    made = "new account" if res.created_user else "existing account"
    cli.out.print(f"institution {institution} set up; {qa} ({made}) is its first QA officer")


@institution_app.command("list")
def institution_list(as_json: cli.JsonOpt = False) -> None:
    """Institution folders under the SOP folder, whether they validate, and their staff."""
    from flows.services.institutions import list_institutions

    rows = cli.run(list_institutions, cli.settings())
    if as_json:
        cli.emit_json(rows)
        return
    if not rows:
        cli.out.print(f"no institution folders under {cli.settings().sops_dir}: `sopflow init DIR` scaffolds one")
    for r in rows:
        state = "valid" if r["valid"] else f"[red]{len(r['problems'])} problems[/red]"
        cli.out.print(
            f"{r['id']:24} {state}  {escape(r['name'] or '?')}  {r['sops'] or 0} SOPs  "
            f"{r['staff']} staff, {r['qa_officers']} QA  set up by {r['set_up_by'] or 'nobody yet'}"
        )


def _grant_args(role: str) -> tuple[str, str]:
    inst, sep, rname = role.partition(":")
    if not sep or not inst or not rname:
        raise typer.BadParameter(f"expected INSTITUTION:ROLE, got {role!r}", param_hint="--role")
    return inst, rname


def user_grant(
    username: str, role: RoleOpt, officer: cli.AsOpt, password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD"
) -> None:
    """Give a user a role at an institution (a QA officer of that institution, --as)."""
    from flows.services.roles import grant

    inst, rname = _grant_args(role)
    cli.run(grant, cli.settings(), username, inst, rname, cli.officer(officer, password_env))
    cli.out.print(f"user {username} now holds {role}")


def user_revoke(
    username: str,
    role: RoleOpt,
    officer: cli.AsOpt,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the record).")],
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Withdraw a role (a QA officer of that institution, --as); the grant stays in the record."""
    from flows.services.roles import revoke

    inst, rname = _grant_args(role)
    cli.run(revoke, cli.settings(), username, inst, rname, cli.officer(officer, password_env), reason)
    cli.out.print(f"user {username} no longer holds {role}")


def register(app: typer.Typer, user_app: typer.Typer) -> None:
    app.command("init")(init)
    app.add_typer(admin_app, name="admin")
    app.add_typer(institution_app, name="institution")
    user_app.command("grant")(user_grant)
    user_app.command("revoke")(user_revoke)
