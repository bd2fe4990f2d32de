"""Administration: users, role grants, account state and training records, with the rules for
who may change them. The CLI (``sopflow user …``, ``sopflow training …``) stays thin over this.

Who may do what:

- ``add_user``: the installation administrator (whoever runs sopflow with access to its database
  and SOP folder); recorded as actor ``admin``. Usernames are unique forever: rows are never
  deleted, so a disabled user's name can never be given to someone else (no shared accounts).
- ``disable_user``, ``enable_user``, ``unlock_user``: a QA officer (role ``qa``) at an
  institution where the target user holds a role, re-authenticated with their password.
- ``change_password``: the user, with the old password; or such a QA officer (a reset).
- ``grant_training``: such a QA officer (``--as``), or the installation administrator.

Every sign-in goes through ``sign_in``: failures are audited and counted, and the threshold-th
consecutive failure locks the account (``flows.record.accounts``). Refusals are audited.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.errors import (
    AuthenticationError,
    NotAuthorizedError,
    RecordError,
    SopNotFoundError,
)
from flows.record import accounts, ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import RoleGrant, SopVersion, User, utcnow
from flows.record.training import record_training, training_records
from flows.record.users import MIN_PASSWORD, find_user, grant_role, hash_password
from flows.record.users import add_user as _add_user
from flows.sop.catalog import INSTITUTION_FILE, PRODUCTS_FILE, Catalog

__all__ = [
    "OFFICER_ROLE",
    "Officer",
    "add_user",
    "change_password",
    "disable_user",
    "enable_user",
    "grant_training",
    "list_training",
    "list_users",
    "sign_in",
    "unlock_user",
]

OFFICER_ROLE = "qa"
"""The role that may unlock, disable, enable, reset passwords of and train users of its institution."""


@dataclass(frozen=True)
class Officer:
    """Who acts: a user name and the password they re-authenticate with."""

    username: str
    password: str


def has_users(settings: Settings) -> bool:
    """Whether any user exists (the first one is created without an officer: bootstrap)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return s.exec(select(User.id).limit(1)).first() is not None


def add_user(
    settings: Settings,
    username: str,
    printed_name: str,
    password: str,
    grants: list[tuple[str, str]],
    *,
    actor: str = "admin",
    officer: Officer | None = None,
) -> str:
    """Create a user and grant roles; every role must exist in its institution.

    With ``officer``, a QA officer creates the account: they re-authenticate (audited) and must
    hold role ``qa`` at every institution they grant a role at; the record names them. Without,
    the caller is the installation administrator (the first account, the demo, the tests).

    Raises:
        SopNotFoundError: unknown institution. RecordError: unknown role, bad or taken username.
        AuthenticationError, NotAuthorizedError: the officer's password, or their authority.
    """
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    for inst_id, role in grants:
        inst = catalog.institution(inst_id)
        if role not in inst.spec.roles:
            close = difflib.get_close_matches(role, list(inst.spec.roles), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Roles: {', '.join(sorted(inst.spec.roles))}."
            raise RecordError(f"institution {inst_id!r} has no role {role!r}.{hint}")
    init_db(settings.database_url)
    if officer is not None:
        who = sign_in(settings, officer.username, officer.password, f"user.add {username}")
        with read_session(settings.database_url) as s:
            theirs = _institutions(s, who.id, OFFICER_ROLE)
        outside = sorted({inst for inst, _ in grants} - set(theirs))
        if not grants or outside:
            where = ", ".join(repr(i) for i in outside) if outside else "no institution"
            raise _refuse(
                settings,
                who,
                "user.add",
                username,
                f"user {who.username!r} may not add users with roles at {where}: that takes role {OFFICER_ROLE!r} there",
            )
        actor = who.id
    with write_session(settings.database_url) as s:
        user = _add_user(s, username, printed_name, password, actor=actor)
        for inst_id, role in grants:
            grant_role(s, user, inst_id, role, actor=actor)
        return user.id


# -- sign-in ------------------------------------------------------------------------------------
def sign_in(settings: Settings, username: str, password: str, purpose: str, *, allow_temporary: bool = False) -> User:
    """Authenticate, audited: ``auth.ok``, or ``auth.failed`` / ``auth.refused`` and perhaps a lock.

    The password is checked outside the write lock (argon2 is slow on purpose); the account's
    state is checked again inside it. A lock is written in its own transaction, so it stays
    although the sign-in fails. Returns the user detached from any session.

    Raises:
        AuthenticationError: unknown user, wrong password, disabled or locked account.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        result = accounts.check_credentials(s, username, password)
        if isinstance(result, User):
            s.expunge(result)
    with write_session(settings.database_url) as s:
        if isinstance(result, User):
            if not accounts.is_active(s, result.id):
                result = accounts.Refusal(
                    "disabled", f"user {username!r}: the account is disabled; a QA officer must enable it"
                )
            elif accounts.is_locked(s, result.id):
                result = accounts.Refusal("locked", accounts.lock_message(s, result))
            elif not allow_temporary and accounts.must_change_password(s, result.id):
                result = accounts.Refusal(
                    "temporary",
                    f"user {username!r}: the password was reset by a QA officer; "
                    f"set your own first (sopflow user passwd {username})",
                )
            else:
                accounts.record_success(s, result, purpose)
                return result
        message = accounts.record_failure(s, username, result, purpose, threshold=settings.lockout_threshold)
    raise AuthenticationError(message)


def _target(session: Session, username: str) -> User:
    user = find_user(session, username)
    if user is None:
        names = list(session.exec(select(User.username)))
        close = difflib.get_close_matches(username, names, n=1)
        raise RecordError(
            f"no user {username!r}." + (f" Did you mean {close[0]!r}?" if close else " `sopflow user list` lists them.")
        )
    session.expunge(user)
    return user


def _institutions(session: Session, user_id: str, role: str | None = None) -> set[str]:
    query = select(RoleGrant.institution).where(RoleGrant.user_id == user_id)
    if role is not None:
        query = query.where(RoleGrant.role == role)
    return set(session.exec(query))


def _refuse(settings: Settings, actor: User, action: str, target: str, problem: str) -> NotAuthorizedError:
    with write_session(settings.database_url) as s:
        ledger.audit(
            s,
            actor=actor.id,
            action=f"{action}.refused",
            object_type="sf_user",
            object_id=target,
            payload={"problem": problem},
            reason=problem,
        )
    return NotAuthorizedError(problem)


def _officer_over(settings: Settings, officer: Officer, target_name: str, action: str, verb: str) -> tuple[User, User]:
    """Authenticate ``officer`` and check they hold role qa where ``target_name`` holds a role."""
    actor = sign_in(settings, officer.username, officer.password, f"{action} {target_name}")
    with read_session(settings.database_url) as s:
        target = _target(s, target_name)
        where = _institutions(s, target.id)
        mine = _institutions(s, actor.id, OFFICER_ROLE)
    problem = None
    if not where & mine:
        problem = (
            f"user {actor.username!r} may not {verb} {target.username!r}: that takes role {OFFICER_ROLE!r} at an "
            f"institution where {target.username!r} holds a role ({', '.join(sorted(where)) or 'none'})"
        )
    elif actor.id == target.id and action != "user.passwd":
        problem = f"user {actor.username!r} may not {verb} their own account; another QA officer must"
    if problem:
        raise _refuse(settings, actor, action, target.username, problem)
    return actor, target


# -- account changes ------------------------------------------------------------------------------
def _change(settings: Settings, username: str, officer: Officer, kind: str, verb: str, reason: str | None) -> None:
    actor, target = _officer_over(settings, officer, username, f"user.{verb}", verb)
    with write_session(settings.database_url) as s:
        active, locked = accounts.is_active(s, target.id), accounts.is_locked(s, target.id)
        already = {
            "disabled": None if active else "is disabled already",
            "enabled": None if not active else "is not disabled",
            "unlocked": None if locked else "is not locked",
        }[kind]
        if already:
            raise RecordError(f"user {username!r} {already}")
        accounts.append_event(s, target, kind, actor=actor.id, reason=reason)


def disable_user(settings: Settings, username: str, officer: Officer, *, reason: str | None = None) -> None:
    """Disable an account (it can no longer sign in or sign; its records stay). Raises AuthenticationError,
    NotAuthorizedError, RecordError."""
    _change(settings, username, officer, "disabled", "disable", reason)


def enable_user(settings: Settings, username: str, officer: Officer, *, reason: str | None = None) -> None:
    """Enable a disabled account again."""
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
        actor, target = _officer_over(settings, officer, username, "user.passwd", "set the password of")
    elif old_password is not None:
        actor = target = sign_in(settings, username, old_password, "change password", allow_temporary=True)
    else:
        raise RecordError(f"user {username!r}: give the old password, or act as a QA officer with --as")
    with read_session(settings.database_url) as s:
        current = accounts.password_hash(s, target)
    from flows.record.users import _HASHER

    try:
        same = _HASHER.verify(current, new_password)
    except Exception:  # argon2 VerificationError / InvalidHashError: a different password
        same = False
    if same:
        raise RecordError(f"user {username!r}: the new password must differ from the current one")
    new_hash = hash_password(new_password)
    with write_session(settings.database_url) as s:
        # A reset is temporary: the officer knows it, so it may only be used to set the user's own.
        accounts.append_event(
            s,
            target,
            "password_set",
            actor=actor.id,
            data={"hash": new_hash, "temporary": officer is not None},
            reason=reason or ("reset by a QA officer" if officer else "changed by the user"),
        )


def list_users(settings: Settings) -> list[dict[str, Any]]:
    """Every user (disabled ones too) with roles, state and creation, by user name."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        out = []
        for u in s.exec(select(User).order_by(col(User.username))):
            grants = s.exec(select(RoleGrant).where(RoleGrant.user_id == u.id))
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


# -- training -------------------------------------------------------------------------------------
def _did_you_mean(what: str, wanted: str, options: set[str], where: str = "") -> SopNotFoundError:
    close = difflib.get_close_matches(wanted, sorted(options), n=1)
    hint = (
        f"Did you mean {close[0]!r}?"
        if close
        else (f"Known {what}s: {', '.join(sorted(options))}." if options else f"There are no {what}s.")
    )
    return SopNotFoundError(f"no {what} {wanted!r}{where}. {hint}")


def _check_sop_version(settings: Settings, session: Session, institution: str, sop_id: str, version: int) -> None:
    """The SOP revision must exist: in ``sops/`` now, or stored because a run used it."""
    from flows.errors import SopDefinitionError

    stored = list(session.exec(select(SopVersion.institution, SopVersion.sop_id, SopVersion.version)))
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    if institution not in set(catalog.institutions()) | {r[0] for r in stored}:
        raise _did_you_mean("institution", institution, set(catalog.institutions()) | {r[0] for r in stored})
    folder = settings.sops_dir / institution
    files = (
        {p.stem for p in folder.glob("*.yaml") if p.name not in (INSTITUTION_FILE, PRODUCTS_FILE)}
        if folder.is_dir()
        else set()
    )
    ids = files | {r[1] for r in stored if r[0] == institution}
    if sop_id not in ids:
        raise _did_you_mean("SOP", sop_id, ids, f" in {institution}")
    versions = {r[2] for r in stored if r[0] == institution and r[1] == sop_id}
    if sop_id in files:
        with contextlib.suppress(SopDefinitionError):  # a broken file: only the revisions runs used count
            versions.add(catalog.get_sop(institution, sop_id).definition.version)
    if version not in versions:
        known = ", ".join(str(v) for v in sorted(versions)) or "none"
        raise SopNotFoundError(f"{institution}/{sop_id} has no version {version}; known versions: {known}")


def _trained_at(settings: Settings, institution: str, raw: str | None) -> datetime:
    """``--date``: an ISO date (midnight in the institution's time zone) or date-time with an offset; not in the future."""
    now = utcnow()
    if raw is None:
        return now
    try:
        if len(raw) == 10:
            from flows.sop.load import load_institution_file

            try:
                zone = ZoneInfo(load_institution_file(settings.sops_dir / institution / INSTITUTION_FILE).timezone)
            except Exception:  # no or broken institution file: UTC
                zone = ZoneInfo("UTC")
            when = datetime.combine(date.fromisoformat(raw), time(0), tzinfo=zone)
        else:
            when = datetime.fromisoformat(raw)
    except ValueError:
        raise RecordError(
            f"training date {raw!r}: expected an ISO date (2026-11-01) or date-time with an offset"
        ) from None
    if when.tzinfo is None:
        raise RecordError(f"training date {raw!r}: a date-time needs an offset (e.g. +08:00)")
    if when > now:
        raise RecordError(f"training date {raw!r} is in the future; record training once it has taken place")
    return when.astimezone(UTC)


def grant_training(
    settings: Settings,
    username: str,
    institution: str,
    sop_id: str,
    version: int,
    *,
    trainer: str | None = None,
    trained_on: str | None = None,
    officer: Officer | None = None,
    actor: str = "admin",
) -> str:
    """Record that ``username`` is trained on ``sop_id`` v``version`` at ``institution``; returns the record's id.

    By a QA officer of that institution (``officer``), or by the installation administrator
    (recorded as ``actor``, like ``add_user``).

    Raises:
        SopNotFoundError (unknown institution, SOP or version, with "did you mean"), RecordError,
        AuthenticationError, NotAuthorizedError
    """
    init_db(settings.database_url)
    actor_id, actor_name = actor, None
    if officer is not None:
        actor = sign_in(settings, officer.username, officer.password, f"training.grant {username}")
        with read_session(settings.database_url) as s:
            if institution not in _institutions(s, actor.id, OFFICER_ROLE):
                problem = f"user {actor.username!r} may not record training at {institution!r}: that takes role {OFFICER_ROLE!r} there"
            else:
                problem = None
        if problem:
            raise _refuse(settings, actor, "training.grant", username, problem)
        actor_id, actor_name = actor.id, actor.printed_name
    who = (trainer or "").strip() or actor_name
    if not who:
        raise RecordError("training: name the trainer with --trainer (the name on the training record)")
    when = _trained_at(settings, institution, trained_on)
    with write_session(settings.database_url) as s:
        user = _target(s, username)
        _check_sop_version(settings, s, institution, sop_id, version)
        return record_training(s, user, institution, sop_id, version, trained_at=when, trainer=who, actor=actor_id).id


def list_training(settings: Settings, username: str | None = None) -> list[dict[str, Any]]:
    """Training records (of one user), oldest entry first."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        names = {u.id: u.username for u in s.exec(select(User))}
        user_id = _target(s, username).id if username else None
        return [
            {
                "username": names.get(r.user_id, r.user_id),
                "institution": r.institution,
                "sop_id": r.sop_id,
                "sop_version": r.sop_version,
                "trained_at": r.trained_at,
                "trainer": r.trainer,
                "recorded_by": names.get(r.recorded_by, r.recorded_by),
                "recorded_at": r.recorded_at,
            }
            for r in training_records(s, user_id)
        ]
