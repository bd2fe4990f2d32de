"""Edge of the data path: ``sopflow user …`` and ``sopflow training …``, thin over
``flows.services.accounts`` and ``flows.services.training`` (which decide who may).

    sopflow user add USER --name N --role INST:ROLE    create a user (installation administrator)
    sopflow user disable|enable|unlock USER --as QA    a QA officer where USER holds a role
    sopflow user passwd USER [--as QA]                 old password, or a QA officer's reset
    sopflow user list [--json]                         users, roles, state
    sopflow training grant USER --institution I --sop ID --version V [--trainer N] [--date D] [--as QA]
    sopflow training list [--user U] [--json]

Passwords: the acting user's from ``SOPFLOW_PASSWORD`` (or ``--password-env``) or a prompt; a new
password from ``SOPFLOW_NEW_PASSWORD`` or a prompt (asked twice). ``flows.cli`` mounts both apps.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli import common as cli

__all__ = ["training_app", "user_app"]

user_app = typer.Typer(help="Users, their roles and account state.", no_args_is_help=True)
training_app = typer.Typer(help="Training records: who may sign which SOP version.", no_args_is_help=True)

OfficerOpt = Annotated[str, typer.Option("--as", help="Your sopflow user name (role qa where the user holds a role).")]
OptOfficerOpt = Annotated[str | None, typer.Option("--as", help="Act as this QA officer (re-authenticates).")]
PasswordEnv = Annotated[
    str, typer.Option("--password-env", help="Read your password from this environment variable when it is set.")
]
NewPasswordEnv = Annotated[
    str, typer.Option("--new-password-env", help="Read the new password from this environment variable when it is set.")
]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (kept in the audit trail).")]


@user_app.command("add")
def user_add(
    username: str,
    name: Annotated[str, typer.Option("--name", help="Printed name, shown on signatures.")],
    role: Annotated[list[str] | None, typer.Option("--role", help="INSTITUTION:ROLE (repeatable).")] = None,
    password_env: Annotated[
        str, typer.Option("--password-env", help="Read the new password from this variable.")
    ] = "SOPFLOW_NEW_PASSWORD",
    officer: OptOfficerOpt = None,
    officer_password_env: Annotated[
        str, typer.Option("--officer-password-env", help="The --as officer's password variable.")
    ] = "SOPFLOW_PASSWORD",
) -> None:
    """Create a user with roles: the first account needs nobody; every later one a QA officer (--as) of its institutions."""
    from flows.services.accounts import add_user

    grants = []
    for r in role or []:
        inst, sep, rname = r.partition(":")
        if not sep:
            raise typer.BadParameter(f"expected INSTITUTION:ROLE, got {r!r}", param_hint="--role")
        grants.append((inst, rname))
    password = cli.new_password(username, password_env)
    who = cli.officer(officer, officer_password_env) if officer else None
    cli.run(add_user, cli.settings(), username, name, password, grants, officer=who)
    cli.out.print(f"user {username} added" + (f" with {', '.join(role or [])}" if role else ""))


def _change(fn_name: str, done: str, username: str, officer: str, password_env: str, reason: str | None) -> None:
    from flows.services import accounts

    cli.run(getattr(accounts, fn_name), cli.settings(), username, cli.officer(officer, password_env), reason=reason)
    cli.out.print(f"user {username} {done}")


@user_app.command("disable")
def user_disable(
    username: str, officer: OfficerOpt, reason: ReasonOpt = None, password_env: PasswordEnv = "SOPFLOW_PASSWORD"
) -> None:
    """Disable an account: it can no longer sign in; its records and its name stay (never reused)."""
    _change("disable_user", "disabled", username, officer, password_env, reason)


@user_app.command("enable")
def user_enable(
    username: str, officer: OfficerOpt, reason: ReasonOpt = None, password_env: PasswordEnv = "SOPFLOW_PASSWORD"
) -> None:
    """Enable a disabled account again."""
    _change("enable_user", "enabled", username, officer, password_env, reason)


@user_app.command("unlock")
def user_unlock(
    username: str, officer: OfficerOpt, reason: ReasonOpt = None, password_env: PasswordEnv = "SOPFLOW_PASSWORD"
) -> None:
    """Unlock an account locked by failed sign-ins."""
    _change("unlock_user", "unlocked", username, officer, password_env, reason)


@user_app.command("passwd")
def user_passwd(
    username: str,
    officer: OptOfficerOpt = None,
    reason: ReasonOpt = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
    new_password_env: NewPasswordEnv = "SOPFLOW_NEW_PASSWORD",
) -> None:
    """Change a password: yours with the old one (SOPFLOW_PASSWORD), or another's as a QA officer (--as)."""
    from flows.services.accounts import change_password

    if officer is not None:
        who = cli.officer(officer, password_env)
        new = cli.new_password(username, new_password_env)
        cli.run(change_password, cli.settings(), username, new, officer=who, reason=reason)
    else:
        old = cli.password(username, password_env)
        new = cli.new_password(username, new_password_env)
        cli.run(change_password, cli.settings(), username, new, old_password=old, reason=reason)
    cli.out.print(f"password of {username} changed")


@user_app.command("list")
def user_list(as_json: cli.JsonOpt = False) -> None:
    """Every user with printed name, roles and state (disabled users too: their names stay taken)."""
    from rich.markup import escape

    from flows.services.accounts import list_users

    rows = cli.run(list_users, cli.settings())
    if as_json:
        cli.emit_json(rows)
        return
    if not rows:
        cli.out.print("no users yet: `sopflow user add` creates one")
    for r in rows:
        state = "disabled" if not r["active"] else ("locked" if r["locked"] else "active")
        cli.out.print(
            f"{r['username']:20} {state:9} {escape(r['printed_name'])}  {' '.join(r['roles']) or '(no roles)'}  "
            f"created {r['created_at']:%Y-%m-%d} by {r['created_by']}"
        )


@training_app.command("grant")
def training_grant(
    username: str,
    institution: Annotated[str, typer.Option(help="Institution id (folder under sops/).")],
    sop: Annotated[str, typer.Option("--sop", help="SOP id.")],
    version: Annotated[int, typer.Option("--version", help="SOP version the user was trained on.")],
    trainer: Annotated[
        str | None, typer.Option("--trainer", help="The trainer's name (default: the --as officer).")
    ] = None,
    date: Annotated[
        str | None, typer.Option("--date", help="ISO date or date-time of the training (default: now).")
    ] = None,
    officer: OptOfficerOpt = None,
    password_env: PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Record that a user is trained on an SOP version (by a QA officer of the institution, --as)."""
    from flows.services.training import grant_training

    who = cli.officer(officer, password_env) if officer else None
    cli.run(
        grant_training,
        cli.settings(),
        username,
        institution,
        sop,
        version,
        trainer=trainer,
        trained_on=date,
        officer=who,
    )
    cli.out.print(f"training recorded: {username} on {institution}/{sop} v{version}")


@training_app.command("list")
def training_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's records.")] = None,
    as_json: cli.JsonOpt = False,
) -> None:
    """Training records, oldest entry first."""
    from rich.markup import escape

    from flows.services.training import list_training

    rows = cli.run(list_training, cli.settings(), user)
    if as_json:
        cli.emit_json(rows)
        return
    if not rows:
        cli.out.print(
            "no training records" + (f" for {user}" if user else "") + ": `sopflow training grant` records one"
        )
    for r in rows:
        cli.out.print(
            f"{r['username']:20} {r['institution']}/{r['sop_id']} v{r['sop_version']}  trained {r['trained_at']:%Y-%m-%d} "
            f"by {escape(r['trainer'])}  (recorded by {r['recorded_by']} {r['recorded_at']:%Y-%m-%d %H:%M} UTC)"
        )
