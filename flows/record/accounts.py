"""Stage 3: the state of an account, read out of append-only ``UserEvent`` rows, and lockout.

A ``User`` row never changes. Its current password hash is the newest ``password_set`` event's
(else the row's own), it is active unless its newest ``disabled``/``enabled`` event is
``disabled``, and locked when its newest ``locked``/``unlocked`` event is ``locked``; "newest" is
by the user's event position ``n``, never by clock.

Lockout: every failed authentication is an ``auth.failed`` audit event (object ``sf_user`` /
user name) and every successful one an ``auth.ok`` event. The failures that count are those
after the newest reset point: a successful sign-in, the account's creation, an unlock or a
password change, all found by their place in the audit chain (``seq``). When they reach the
threshold, a ``locked`` event is written (by ``system``). Must not import prefect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, func, select

from flows.errors import AuthenticationError
from flows.record import ledger
from flows.record.tables import AuditEvent, User, UserEvent, next_position, utcnow
from flows.record.users import find_user, spend_verification_time, verify_password

__all__ = [
    "EVENT_KINDS",
    "Refusal",
    "append_account_event",
    "authenticate",
    "check_credentials",
    "failures_since_reset",
    "is_active",
    "is_locked",
    "lock_message",
    "password_hash",
    "record_failure",
    "record_success",
]

EVENT_KINDS = ("password_set", "disabled", "enabled", "locked", "unlocked", "language")
_RESETS = ("unlocked", "password_set")
"""Account events after which earlier failed sign-ins no longer count."""


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
        return Refusal("disabled", f"user {username!r}: the account is disabled; a QA officer must enable it")
    if is_locked(session, user.id):
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


def _reset_seq(session: Session, username: str) -> int:
    """The audit position after which failed sign-ins of ``username`` count."""
    seqs = [
        session.exec(
            select(func.max(AuditEvent.seq)).where(
                AuditEvent.object_type == "sf_user", AuditEvent.object_id == username, AuditEvent.action == "auth.ok"
            )
        ).one()
    ]
    user = find_user(session, username)
    if user is not None:
        seqs.append(
            session.exec(
                select(func.max(AuditEvent.seq)).where(
                    AuditEvent.object_type == User.__tablename__, AuditEvent.object_id == user.id
                )
            ).one()
        )
        resets = list(
            session.exec(select(UserEvent.id).where(UserEvent.user_id == user.id, col(UserEvent.kind).in_(_RESETS)))
        )
        if resets:
            seqs.append(
                session.exec(
                    select(func.max(AuditEvent.seq)).where(
                        AuditEvent.object_type == UserEvent.__tablename__, col(AuditEvent.object_id).in_(resets)
                    )
                ).one()
            )
    return max((s for s in seqs if s is not None), default=0)


def failures_since_reset(session: Session, username: str) -> int:
    """Consecutive failed sign-ins of ``username``: ``auth.failed`` events after the newest reset point."""
    return int(
        session.exec(
            select(func.count())
            .select_from(AuditEvent)
            .where(
                AuditEvent.object_type == "sf_user",
                AuditEvent.object_id == username,
                AuditEvent.action == "auth.failed",
                AuditEvent.seq > _reset_seq(session, username),
            )
        ).one()
    )


def record_failure(session: Session, username: str, refusal: Refusal, purpose: str, *, threshold: int) -> str:
    """Audit a refused sign-in (inside a write session); lock the account at the threshold.

    A wrong password (or unknown name) is ``auth.failed`` and counts; a sign-in refused because
    the account is disabled or locked is ``auth.refused`` and does not. Returns the message.
    """
    if refusal.kind in ("disabled", "locked", "temporary"):
        ledger.audit(
            session,
            actor=username,
            action="auth.refused",
            object_type="sf_user",
            object_id=username,
            payload={"purpose": purpose, "problem": refusal.kind},
            reason=refusal.message,
        )
        return refusal.message
    ledger.audit(
        session,
        actor=username,
        action="auth.failed",
        object_type="sf_user",
        object_id=username,
        payload={"purpose": purpose},
    )
    user = find_user(session, username)
    if user is None or is_locked(session, user.id):
        return refusal.message
    failures = failures_since_reset(session, username)
    if failures < threshold:
        return refusal.message
    append_account_event(
        session,
        user,
        "locked",
        actor="system",
        data={"failures": failures, "threshold": threshold},
        reason=f"{failures} consecutive failed sign-ins (threshold {threshold})",
    )
    return f"{refusal.message}; {lock_message(session, user).split(': ', 1)[1]}"


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
