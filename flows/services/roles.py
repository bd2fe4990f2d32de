"""The service floor: granting and revoking roles after an account exists.

Who may (``flows.services.guard``): a QA officer of the institution (``qa`` there,
re-authenticated), never on their own account (so an institution always keeps the QA officer who
revoked another's ``qa``). A grant is a ``RoleGrant`` row, a revocation a
``RoleRevocation`` row naming it with the reason: nothing is deleted, and a role given again after
a revocation is a new grant. Refusals are audited (``role.grant.refused``, ``role.revoke.refused``).
"""

from __future__ import annotations

from flows.config import Settings
from flows.errors import RecordError, did_you_mean
from flows.record import accounts
from flows.record.db import read_session, write_session
from flows.record.users import current_grants, grant_role, revoke_role
from flows.services import guard
from flows.services.guard import Officer
from flows.sop.catalog import Catalog

__all__ = ["grant", "revoke"]


def _check_role(settings: Settings, institution: str, role: str) -> None:
    inst = Catalog(settings.sops_dir, settings.templates_dir).institution(institution)
    if role not in inst.spec.roles:
        hint = did_you_mean(role, sorted(inst.spec.roles), "Roles")
        raise RecordError(f"institution {institution!r} has no role {role!r}. {hint}".rstrip())


def _officer(settings: Settings, officer: Officer, username: str, institution: str, verb: str) -> tuple[str, str]:
    """(officer id, target id) once the officer signed in and may ``verb`` roles at ``institution``."""
    who = guard.require_officer(
        settings,
        officer,
        {institution},
        action=f"role.{verb}",
        target=username,
        purpose=f"{verb} roles",
        nobody="a QA officer of the institution changes roles: --as QA_USER",
    )
    with read_session(settings.database_url) as s:
        target = guard.target_user(s, username)
    if target.id == who.id:
        raise guard.refuse(
            settings,
            who.id,
            f"role.{verb}",
            "sf_user",
            username,
            f"user {officer.username!r} may not {verb} roles of their own account; another QA officer must",
        )
    return who.id, target.id


def grant(settings: Settings, username: str, institution: str, role: str, officer: Officer) -> str:
    """Give ``username`` ``role`` at ``institution``; returns the grant's id.

    Raises:
        SopNotFoundError, RecordError (unknown role, held already, disabled account), NotFoundError,
        AuthenticationError, NotAuthorizedError
    """
    _check_role(settings, institution, role)
    actor, target_id = _officer(settings, officer, username, institution, "grant")
    with write_session(settings.database_url) as s:
        if current_grants(s, user_id=target_id, institution=institution, role=role):
            raise RecordError(f"user {username!r} holds {institution}:{role} already")
        user = guard.target_user(s, username)
        if not accounts.is_active(s, user.id):
            raise RecordError(f"user {username!r} is disabled; enable the account before giving it a role")
        return grant_role(s, user, institution, role, actor=actor).id


def revoke(settings: Settings, username: str, institution: str, role: str, officer: Officer, reason: str) -> str:
    """Withdraw ``role`` at ``institution`` from ``username`` (a ``RoleRevocation`` row); returns its id.

    Raises:
        RecordError (no reason, not held), NotFoundError, AuthenticationError, NotAuthorizedError
    """
    if not reason.strip():
        raise RecordError("--reason: a revocation needs a reason (it is kept in the record)")
    actor, target_id = _officer(settings, officer, username, institution, "revoke")
    with write_session(settings.database_url) as s:
        held = current_grants(s, user_id=target_id, institution=institution, role=role)
        if not held:
            raise RecordError(f"user {username!r} does not hold {institution}:{role}")
        for g in held:
            last = revoke_role(s, g, actor=actor, reason=reason.strip())
        return last.id
