"""The service floor: accounts. Users, their roles and state, passwords, language, web sign-in.

Who may (``flows.services.guard``):

- ``add_user``: the very first account needs nobody (whoever installs sopflow: bootstrap); every
  later one a QA officer (``officer``, re-authenticated) holding role ``qa`` at every institution
  it grants a role at, named in the record. Anyone else is refused and the refusal audited. User
  names are unique forever: rows are never deleted, so a name is never given to someone else.
- ``disable_user``, ``enable_user``, ``unlock_user``: a QA officer at an institution where the
  user holds a role, never on their own account.
- ``change_password``: the user, with the old password; or such a QA officer (a reset, which is
  temporary: it signs nothing until the user sets their own).

A ``User`` row never changes: state changes are append-only ``UserEvent`` rows
(``flows.record.accounts``), the newest one deciding.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import RecordError, SopInputError, did_you_mean
from flows.record import accounts, ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import User, UserEvent
from flows.record.users import MIN_PASSWORD, current_grants, find_user, grant_role, hash_password, verify_password
from flows.record.users import add_user as _record_user
from flows.services import guard, throttle
from flows.services.guard import Officer
from flows.sop.catalog import Catalog

__all__ = [
    "LANGUAGES",
    "Officer",
    "add_user",
    "change_password",
    "disable_user",
    "enable_user",
    "has_users",
    "language_of",
    "list_users",
    "set_language",
    "sign_out",
    "unlock_user",
    "user_summary",
    "web_sign_in",
]

NEED_OFFICER = "once the first account exists, a QA officer of the user's institutions adds users: --as QA_USER"
"""Why an account is refused when nobody acts as a QA officer and an account exists already."""
LANGUAGES = ("en", "zh")
"""The languages pages (and, where templates exist, documents) come in: English, Simplified Chinese."""


def has_users(settings: Settings) -> bool:
    """Whether any user exists (the first one is created without an officer: bootstrap)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return not guard.first_account(s)


def add_user(
    settings: Settings,
    username: str,
    printed_name: str,
    password: str,
    grants: list[tuple[str, str]],
    *,
    officer: Officer | None = None,
) -> str:
    """Create a user and grant roles; every role must exist in its institution. Returns the user's id.

    Raises:
        SopNotFoundError: unknown institution. RecordError: unknown role, bad or taken username.
        AuthenticationError, NotAuthorizedError: no QA officer once an account exists, or their authority.
    """
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    for inst_id, role in grants:
        inst = catalog.institution(inst_id)
        if role not in inst.spec.roles:
            hint = did_you_mean(role, sorted(inst.spec.roles), "Roles")
            raise RecordError(f"institution {inst_id!r} has no role {role!r}. {hint}".rstrip())
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        bootstrap = guard.first_account(s)
    actor = "bootstrap"
    if officer is not None or not bootstrap:
        who = guard.require_officer(
            settings,
            officer,
            {inst for inst, _ in grants},
            action="user.add",
            target=username,
            purpose="add users with roles",
            nobody=NEED_OFFICER,
        )
        actor = who.id
    with write_session(settings.database_url) as s:
        if actor == "bootstrap" and not guard.first_account(s):  # another account appeared meanwhile
            raise guard.refuse(
                settings,
                guard.UNAUTHENTICATED,
                "user.add",
                "sf_user",
                username,
                NEED_OFFICER,
            )
        user = _record_user(s, username, printed_name, password, actor=actor)
        for inst_id, role in grants:
            grant_role(s, user, inst_id, role, actor=actor)
        return user.id


def _change(settings: Settings, username: str, officer: Officer, kind: str, verb: str, reason: str | None) -> None:
    actor, target = guard.require_officer_over(settings, officer, username, action=f"user.{verb}", verb=verb)
    with write_session(settings.database_url) as s:
        active, locked = accounts.is_active(s, target.id), accounts.is_locked(s, target.id)
        already = {
            "disabled": None if active else "is disabled already",
            "enabled": None if not active else "is not disabled",
            "unlocked": None if locked else "is not locked",
        }[kind]
        if already:
            raise RecordError(f"user {username!r} {already}")
        accounts.append_account_event(s, target, kind, actor=actor.id, reason=reason)
        if kind == "unlocked":  # every client's count of the account starts again
            throttle.forget_account(s, target.username)


def disable_user(settings: Settings, username: str, officer: Officer, *, reason: str | None = None) -> None:
    """Disable an account (it can no longer sign in or sign; its records stay).

    Raises:
        AuthenticationError, NotAuthorizedError, NotFoundError, RecordError
    """
    _change(settings, username, officer, "disabled", "disable", reason)


def enable_user(settings: Settings, username: str, officer: Officer, *, reason: str | None = None) -> None:
    """Enable a disabled account again (raises as ``disable_user``)."""
    _change(settings, username, officer, "enabled", "enable", reason)


def unlock_user(settings: Settings, username: str, officer: Officer, *, reason: str | None = None) -> None:
    """Unlock an account locked by failed sign-ins; its failure count starts again at zero."""
    _change(settings, username, officer, "unlocked", "unlock", reason)


def change_password(
    settings: Settings,
    username: str,
    new_password: str,
    *,
    old_password: str | None = None,
    officer: Officer | None = None,
    reason: str | None = None,
) -> None:
    """Set a new password: by the user with the old one, or by a QA officer over them (a reset).

    Raises:
        AuthenticationError (wrong old password: counts towards the lock), NotAuthorizedError, RecordError
    """
    if len(new_password) < MIN_PASSWORD:
        raise RecordError(f"user {username!r}: the password must have at least {MIN_PASSWORD} characters")
    if officer is not None:
        actor, target = guard.require_officer_over(
            settings, officer, username, action="user.passwd", verb="set the password of", own=True
        )
    elif old_password is not None:
        actor = target = guard.sign_in(settings, username, old_password, "change password", allow_temporary=True)
    else:
        raise RecordError(f"user {username!r}: give the old password, or act as a QA officer with --as")
    with read_session(settings.database_url) as s:
        current = accounts.password_hash(s, target)
    if verify_password(current, new_password):
        raise RecordError(f"user {username!r}: the new password must differ from the current one")
    new_hash = hash_password(new_password)
    with write_session(settings.database_url) as s:
        # A reset is temporary: the officer knows it, so it may only be used to set the user's own.
        accounts.append_account_event(
            s,
            target,
            "password_set",
            actor=actor.id,
            data={"hash": new_hash, "temporary": officer is not None},
            reason=reason or ("reset by a QA officer" if officer else "changed by the user"),
        )
        throttle.forget_account(s, target.username)


def list_users(settings: Settings) -> list[dict[str, Any]]:
    """Every user (disabled ones too) with roles, state and creation, by user name."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        out = []
        for u in s.exec(select(User).order_by(col(User.username))):
            grants = current_grants(s, user_id=u.id)
            out.append(
                {
                    "username": u.username,
                    "printed_name": u.printed_name,
                    "roles": sorted({f"{g.institution}:{g.role}" for g in grants}),
                    "active": accounts.is_active(s, u.id),
                    "locked": accounts.is_locked(s, u.id),
                    "created_at": u.created_at,
                    "created_by": u.created_by,
                }
            )
        return out


def user_summary(settings: Settings, username: str) -> dict[str, Any]:
    """Printed name and roles per institution.

    Raises:
        NotFoundError: no such user.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = guard.target_user(s, username)
        grants = sorted((g.institution, g.role) for g in current_grants(s, user_id=user.id))
    roles: dict[str, list[str]] = {}
    for inst, role in grants:
        roles.setdefault(inst, []).append(role)
    return {"username": username, "printed_name": user.printed_name, "roles": roles}


# -- web sessions and language ----------------------------------------------------------------------
def web_sign_in(settings: Settings, username: str, password: str) -> User:
    """Sign in for a web session (``guard.sign_in``: audited; from the sign-in page, an anonymous
    client, failures make that client wait and every refusal reads ``guard.SIGN_IN_REFUSED``).

    Raises:
        ThrottledError, AuthenticationError
    """
    return guard.sign_in(settings, username, password, "web session")


def sign_out(settings: Settings, username: str, why: str) -> None:
    """Audit the end of a web session: ``logout`` or ``idle`` (the idle timeout ended it). The actor
    is the user's id, as for the sign-in (``auth.ok``) and every other event; a user removed since
    the sign-in is named by the username the session held."""
    with write_session(settings.database_url) as s:
        user = find_user(s, username)
        ledger.audit(
            s,
            actor=user.id if user else username,
            action=f"auth.{why}",
            object_type="sf_user",
            object_id=username,
            payload={"session": "web"},
        )


def _language_of_user(session: Any, user_id: str) -> str | None:
    ev = session.exec(
        select(UserEvent)
        .where(UserEvent.user_id == user_id, UserEvent.kind == "language")
        .order_by(col(UserEvent.n).desc())
        .limit(1)
    ).first()
    return json.loads(ev.data_json).get("language") if ev else None


def set_language(settings: Settings, username: str, language: str) -> None:
    """Record the user's language (``en`` or ``zh``) as an append-only account event.

    Raises:
        SopInputError: not a language sopflow has. NotFoundError: unknown user.
    """
    if language not in LANGUAGES:
        raise SopInputError([f"language {language!r}: expected one of {', '.join(LANGUAGES)}"])
    init_db(settings.database_url)
    with write_session(settings.database_url) as s:
        user = guard.target_user(s, username)
        if _language_of_user(s, user.id) == language:
            return
        accounts.append_account_event(s, user, "language", actor=user.id, data={"language": language})


def language_of(settings: Settings, username: str) -> str | None:
    """The user's chosen language, or None when they never chose one."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        return _language_of_user(s, user.id) if user else None
