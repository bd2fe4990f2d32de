"""Edge of the data path: what every ``sopflow`` command shares. The consoles, the option types,
reading passwords, and the one place a ``FlowsError`` becomes red lines and exit code 1.

Only this layer (and ``flows.web``) formats errors: one red line per problem, exit 1, no
traceback unless ``--debug``. Light on purpose: typer, rich and the standard library; each
command imports the service it calls (the services import SQLModel and more).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from flows.config import Settings, get_settings
from flows.errors import FlowsError, SopDefinitionError, SopInputError

__all__ = [
    "AsOpt",
    "JsonOpt",
    "PasswordEnv",
    "SetOpt",
    "emit_json",
    "err",
    "fail",
    "new_password",
    "officer",
    "out",
    "pairs",
    "password",
    "run",
    "settings",
    "state",
]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="A value as key=value (repeatable).")]
AsOpt = Annotated[str, typer.Option("--as", help="Your sopflow user name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")]
PasswordEnv = Annotated[
    str, typer.Option("--password-env", help="Read the password from this environment variable when it is set.")
]


class _State:
    debug = False
    """``sopflow --debug``: let errors raise, with their tracebacks."""


state = _State()


def settings() -> Settings:
    """The settings from the environment (a ``ConfigError`` becomes a red line in ``flows.cli.main``)."""
    return get_settings()


def pairs(items: list[str] | None) -> dict[str, str]:
    """``--set k=v`` options as a dict."""
    values: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--set")
        values[key.strip()] = value
    return values


def password(username: str, env_name: str) -> str:
    """The user's password: from the environment variable when it is set, else asked at the terminal."""
    value = os.environ.get(env_name)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise typer.BadParameter(
            f"no terminal to ask for {username!r}'s password; set {env_name}", param_hint="--password-env"
        )
    return str(typer.prompt(f"Password for {username}", hide_input=True))


def new_password(username: str, env_name: str) -> str:
    """A new password: from the environment variable when it is set, else asked twice."""
    value = os.environ.get(env_name)
    if value is not None:
        return value
    return str(typer.prompt(f"New password for {username}", hide_input=True, confirmation_prompt=True))


def officer(username: str, env_name: str) -> Any:
    """The acting user's credentials (``flows.services.guard.Officer``), re-authenticated by the service."""
    from flows.services.guard import Officer

    return Officer(username, password(username, env_name))


def emit_json(value: Any) -> None:
    """Write ``value`` as JSON on stdout (dates as ISO 8601): what every ``--json`` prints."""
    import json

    def default(v: Any) -> Any:
        return v.isoformat() if hasattr(v, "isoformat") else str(v)

    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=default) + "\n")


def fail(exc: Exception) -> typer.Exit:
    """Print one red line per problem of ``exc``; the ``typer.Exit(1)`` to raise."""
    lines = (
        [str(p) for p in exc.problems] if isinstance(exc, SopDefinitionError | SopInputError) else str(exc).splitlines()
    )
    for line in lines or [type(exc).__name__]:
        err.print(f"[red]error:[/red] {escape(line)}")
    return typer.Exit(1)


def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a service; turn a ``FlowsError`` into red lines and exit 1 (raise it with ``--debug``)."""
    try:
        return fn(*args, **kwargs)
    except FlowsError as exc:
        if state.debug:
            raise
        raise fail(exc) from None
