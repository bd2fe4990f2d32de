"""Stage 3: users, role grants and authentication (argon2 password hashes).

Must not import prefect.
"""

from __future__ import annotations

import re
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import Session, col, select

from flows.errors import RecordError
from flows.record import ledger
from flows.record.tables import RoleGrant, RoleRevocation, User, utcnow

__all__ = [
    "MIN_PASSWORD",
    "add_user",
    "current_grants",
    "find_user",
    "grant_role",
    "hash_password",
    "revoke_role",
    "roles_of",
    "spend_verification_time",
    "verify_password",
]

# argon2id at OWASP's minimum (19 MiB, 2 passes, 1 lane): argon2-cffi's default (64 MiB, 3 passes,
# 4 lanes) took 0.38 s a hash on a loaded 2-core machine, and every signature re-authenticates.
# Existing hashes keep their own parameters (they are stored in the hash) and still verify.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
_USERNAME = re.compile(r"^[a-z][a-z0-9_.-]{1,39}$")
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def find_user(session: Session, username: str) -> User | None:
    return session.exec(select(User).where(User.username == username)).first()


def add_user(session: Session, username: str, printed_name: str, password: str, *, actor: str) -> User:
    """Create a user (inside a write session). Raises RecordError for a bad or taken username."""
    if not _USERNAME.match(username):
        raise RecordError(
            f"username {username!r}: use 2-40 lowercase letters, digits, '.', '_' or '-', starting with a letter"
        )
    if not printed_name.strip():
        raise RecordError(f"user {username!r}: a printed name is required (it is shown on every signature)")
    if len(password) < MIN_PASSWORD:
        raise RecordError(f"user {username!r}: the password must have at least {MIN_PASSWORD} characters")
    if find_user(session, username) is not None:
        raise RecordError(f"user {username!r} exists already; accounts are never shared or reused")
    user = User(
        username=username,
        printed_name=printed_name.strip(),
        password_hash=hash_password(password),
        created_at=utcnow(),
        created_by=actor,
    )
    ledger.append(session, user, actor=actor, action="user.create")
    return user


def grant_role(session: Session, user: User, institution: str, role: str, *, actor: str) -> RoleGrant:
    grant = RoleGrant(user_id=user.id, institution=institution, role=role, granted_at=utcnow(), granted_by=actor)
    ledger.append(session, grant, actor=actor, action="role.grant")
    return grant


def current_grants(
    session: Session, *, user_id: str | None = None, institution: str | None = None, role: str | None = None
) -> list[RoleGrant]:
    """The role grants in force: every ``RoleGrant`` row without a ``RoleRevocation`` (a revocation
    is a row of its own; the grant stays), optionally of one user, institution or role."""
    query = (
        select(RoleGrant)
        .outerjoin(RoleRevocation, col(RoleRevocation.grant_id) == col(RoleGrant.id))
        .where(col(RoleRevocation.id).is_(None))
    )
    if user_id is not None:
        query = query.where(RoleGrant.user_id == user_id)
    if institution is not None:
        query = query.where(RoleGrant.institution == institution)
    if role is not None:
        query = query.where(RoleGrant.role == role)
    return list(session.exec(query.order_by(col(RoleGrant.granted_at))))


def revoke_role(session: Session, grant: RoleGrant, *, actor: str, reason: str) -> RoleRevocation:
    """Withdraw a grant (inside a write session): a ``RoleRevocation`` row, audited ``role.revoke``."""
    row = RoleRevocation(grant_id=grant.id, revoked_by=actor, reason=reason, revoked_at=utcnow())
    ledger.append(session, row, actor=actor, action="role.revoke", reason=reason)
    return row


def roles_of(session: Session, user_id: str, institution: str) -> set[str]:
    """The roles the user holds at ``institution`` now (revoked grants left out)."""
    return {g.role for g in current_grants(session, user_id=user_id, institution=institution)}


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` is the one ``password_hash`` was made from (argon2; slow on purpose)."""
    try:
        return bool(_HASHER.verify(password_hash, password))
    except (VerificationError, InvalidHashError):
        return False


def spend_verification_time(password: str) -> None:
    """Take as long as a real password check, so a probe cannot tell which user names exist."""
    verify_password(_dummy_hash(), password)


@cache
def _dummy_hash() -> str:
    return _HASHER.hash("not a real password")
