"""Edge of the data path: ``sopflow token …``, integration API tokens, thin over ``flows.services.tokens``.

    sopflow token create --name N --institution I --account USER --scope S [--scope S…] --as QA
    sopflow token list [--institution I] [--json]
    sopflow token revoke TOKEN_ID --reason R --as QA

``flows.cli`` mounts ``token_app`` as ``sopflow token``. The token is printed once, by ``create``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from flows.cli import common as cli

__all__ = ["token_app"]

token_app = typer.Typer(help="Integration API tokens: create, list, revoke.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option("--name", help="Which system holds it (e.g. 'HIS gateway').")],
    institution: Annotated[str, typer.Option("--institution", help="The institution it belongs to.")],
    account: Annotated[str, typer.Option("--account", help="The service account it acts as (a sopflow user).")],
    scope: Annotated[list[str], typer.Option("--scope", help="An action it may take (repeatable).")],
    officer: cli.AsOpt,
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Create a token (a QA officer of the institution, --as); the token is shown only now."""
    from flows.services.tokens import create_token

    token_id, secret = cli.run(
        create_token, cli.settings(), name, institution, account, scope, cli.officer(officer, password_env)
    )
    cli.err.print(f"token {token_id} created for {account} at {institution}: {', '.join(sorted(set(scope)))}")
    cli.err.print("It is shown once; keep it in the client's secret store. sopflow keeps only its sha256.")
    typer.echo(secret)


@token_app.command("list")
def token_list(
    institution: Annotated[str | None, typer.Option("--institution", help="Only this institution.")] = None,
    as_json: cli.JsonOpt = False,
) -> None:
    """Tokens with their institution, account, scopes and whether they are revoked (never the token)."""
    from flows.services.tokens import list_tokens

    rows = cli.run(list_tokens, cli.settings(), institution)
    if as_json:
        cli.emit_json(rows)
        return
    if not rows:
        cli.out.print("no API tokens: `sopflow token create` makes one")
    for r in rows:
        state = f"[red]revoked {r['revoked_at']:%Y-%m-%d}[/red]" if r["revoked_at"] else "[green]active[/green]"
        cli.out.print(
            f"{r['id']}  {state}  {escape(r['name'])}  {r['institution']}  as {r['account']}  "
            f"{' '.join(r['scopes'])}  created {r['created_at']:%Y-%m-%d} by {r['created_by']}"
        )


@token_app.command("revoke")
def token_revoke(
    token_id: str,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the record).")],
    officer: cli.AsOpt,
    password_env: cli.PasswordEnv = "SOPFLOW_PASSWORD",
) -> None:
    """Revoke a token (a QA officer of its institution, --as): every later use is refused."""
    from flows.services.tokens import revoke_token

    cli.run(revoke_token, cli.settings(), token_id, cli.officer(officer, password_env), reason)
    cli.out.print(f"token {token_id} revoked")
