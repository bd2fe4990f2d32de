"""Stage 3: the state of an account, read out of append-only ``UserEvent`` rows, and lockout.

A ``User`` row never changes. Its current password hash is the newest ``password_set`` event's
(else the row's own), it is active unless its newest ``disabled``/``enabled`` event is
``disabled``, and locked when its newest ``locked``/``unlocked`` event is ``locked``; "newest" is
by the user's event position ``n``, never by clock.

Lockout: every failed authentication is an ``auth.failed`` audit event (object ``sf_user`` /
user name, the client in its payload) and every successful one an ``auth.ok`` event. Which
failures count, per account and client, and when they lock the account (a ``locked`` event, by
``system``) is ``flows.services.guard.sign_in``'s (with ``flows.services.throttle``). Must not
import prefect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from flows.errors import AuthenticationError
from flows.record import ledger
from flows.record.tables import User, UserEvent, next_position, utcnow
from flows.record.users import find_user, spend_verification_time, verify_password

__all__ = [
    "EVENT_KINDS",
    "Refusal",
    "append_account_event",
    "authenticate",
    "check_credentials",
    "is_active",
    "is_locked",
    "lock",
    "lock_message",
    "password_hash",
    "record_failure",
    "record_success",
]

EVENT_KINDS = ("password_set", "disabled", "enabled", "locked", "unlocked", "language")


@dataclass(frozen=True)
class Refusal:
    """Why a sign-in is refused: ``unknown`` user, wrong ``password``, ``disabled``, ``locked``, or a
    ``temporary`` password (set by a QA officer) that the user must first replace."""

    kind: str
    message: str


def _newest(session: Session, user_id: str, kinds: tuple[str, ...]) -> UserEvent | None:
    return session.exec(
        select(UserEvent)
        .where(UserEvent.user_id == user_id, col(UserEvent.kind).in_(kinds))
        .order_by(col(UserEvent.n).desc())
        .limit(1)
    ).first()


def password_hash(session: Session, user: User) -> str:
    """The argon2 hash the password is checked against now."""
    ev = _newest(session, user.id, ("password_set",))
    return str(json.loads(ev.data_json)["hash"]) if ev else user.password_hash


def is_active(session: Session, user_id: str) -> bool:
    ev = _newest(session, user_id, ("disabled", "enabled"))
    return ev is None or ev.kind == "enabled"


def must_change_password(session: Session, user_id: str) -> bool:
    """The newest password was set by a QA officer: the officer knows it, so it signs nothing."""
    ev = _newest(session, user_id, ("password_set",))
    return ev is not None and bool(json.loads(ev.data_json).get("temporary"))


def is_locked(session: Session, user_id: str) -> bool:
    ev = _newest(session, user_id, ("locked", "unlocked"))
    return ev is not None and ev.kind == "locked"


def lock_message(session: Session, user: User) -> str:
    ev = _newest(session, user.id, ("locked",))
    failures = json.loads(ev.data_json).get("failures") if ev else None
    return (
        f"user {user.username!r}: account locked after {failures or 'too many'} failed sign-ins; "
        f"a QA officer must unlock it (sopflow user unlock {user.username} --as QA_USER)"
    )


def append_account_event(
    session: Session,
    user: User,
    kind: str,
    *,
    actor: str,
    data: dict[str, Any] | None = None,
    reason: str | None = None,
) -> UserEvent:
    """Append an account event (inside a write session, which holds the lock ``n`` relies on)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown account event {kind!r}")

    ev = UserEvent(
        user_id=user.id,
        n=next_position(session, UserEvent.n, UserEvent.user_id, user.id),
        kind=kind,
        data_json=ledger.canonical(data or {}).decode(),
        at=utcnow(),
        actor=actor,
    )
    ledger.append(session, ev, actor=actor, action=f"user.{kind}", reason=reason)
    return ev


def check_credentials(session: Session, username: str, password: str) -> User | Refusal:
    """The user, if the account may sign in and the password is right; else why not.

    A disabled or locked account is refused whatever the password, so a locked account cannot be
    used to test passwords. Unknown user and wrong password give one message.
    """
    wrong = Refusal("password", f"user {username!r}: wrong user name or password")
    user = find_user(session, username)
    if user is None:
        spend_verification_time(password)  # a probe cannot tell which names exist
        return Refusal("unknown", wrong.message)
    if not is_active(session, user.id):
        spend_verification_time(password)  # as long as a wrong password takes: timing tells nothing
        return Refusal("disabled", f"user {username!r}: the account is disabled; a QA officer must enable it")
    if is_locked(session, user.id):
        spend_verification_time(password)
        return Refusal("locked", lock_message(session, user))
    if not verify_password(password_hash(session, user), password):
        return wrong
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """The user, if the account is active, not locked, and the password is its current one.

    One message for an unknown user and a wrong password (never says which part); a disabled or
    locked account is refused with its own message, whatever the password. Reads only: the
    audited sign-in (failure counting, lockout) is ``flows.services.guard.sign_in``.

    Raises:
        AuthenticationError
    """
    result = check_credentials(session, username, password)
    if not isinstance(result, User):
        raise AuthenticationError(result.message)
    return result


def record_failure(session: Session, username: str, refusal: Refusal, purpose: str, client: str | None) -> None:
    """Audit a refused sign-in (inside a write session): ``auth.failed`` for a wrong password or an
    unknown name, ``auth.refused`` (with the reason) for a disabled or locked account or a temporary
    password. ``client``: where the attempt came from (``flows.services.guard.Channel``)."""
    where = {"client": client} if client else {}
    if refusal.kind in ("disabled", "locked", "temporary"):
        ledger.audit(
            session,
            actor=username,
            action="auth.refused",
            object_type="sf_user",
            object_id=username,
            payload={"purpose": purpose, "problem": refusal.kind, **where},
            reason=refusal.message,
        )
        return
    ledger.audit(
        session,
        actor=username,
        action="auth.failed",
        object_type="sf_user",
        object_id=username,
        payload={"purpose": purpose, **where},
    )


def lock(session: Session, user: User, failures: int, threshold: int, client: str | None) -> str:
    """Lock the account after ``failures`` consecutive failed sign-ins (inside a write session);
    returns the lock's words for the message."""
    append_account_event(
        session,
        user,
        "locked",
        actor="system",
        data={"failures": failures, "threshold": threshold, **({"client": client} if client else {})},
        reason=f"{failures} consecutive failed sign-ins (threshold {threshold})",
    )
    return lock_message(session, user).split(": ", 1)[1]


def record_success(session: Session, user: User, purpose: str) -> None:
    """Audit a successful sign-in (inside a write session): earlier failures no longer count."""
    ledger.audit(
        session,
        actor=user.id,
        action="auth.ok",
        object_type="sf_user",
        object_id=user.username,
        payload={"purpose": purpose},
    )
