"""Stage 3: training records (21 CFR 11.10(i)): who is trained on which SOP revision, where.

A ``TrainingRecord`` is append-only like every record row. ``state.signer_problem`` asks
``is_trained`` before anyone signs a step: the signer must be trained on exactly the SOP id and
version the run uses, at the run's institution. Must not import prefect.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from flows.record import ledger
from flows.record.accounts import is_active
from flows.record.tables import TrainingRecord, User, utcnow
from flows.record.users import current_grants

__all__ = ["coverage", "coverage_problem", "grant_hint", "is_trained", "record_training", "training_records"]


def record_training(
    session: Session,
    user: User,
    institution: str,
    sop_id: str,
    sop_version: int,
    *,
    trained_at: datetime,
    trainer: str,
    actor: str,
) -> TrainingRecord:
    """Append a training record (inside a write session); the caller has checked SOP and version exist."""
    rec = TrainingRecord(
        user_id=user.id,
        institution=institution,
        sop_id=sop_id,
        sop_version=sop_version,
        trained_at=trained_at,
        trainer=trainer,
        recorded_by=actor,
        recorded_at=utcnow(),
    )
    ledger.append(session, rec, actor=actor, action="training.grant")
    return rec


def is_trained(session: Session, user_id: str, institution: str, sop_id: str, sop_version: int) -> bool:
    return (
        session.exec(
            select(TrainingRecord.id)
            .where(
                TrainingRecord.user_id == user_id,
                TrainingRecord.institution == institution,
                TrainingRecord.sop_id == sop_id,
                TrainingRecord.sop_version == sop_version,
            )
            .limit(1)
        ).first()
        is not None
    )


def training_records(session: Session, user_id: str | None = None) -> list[TrainingRecord]:
    """Every training record (of one user), oldest entry first."""
    query = select(TrainingRecord)
    if user_id is not None:
        query = query.where(TrainingRecord.user_id == user_id)
    return list(session.exec(query.order_by(col(TrainingRecord.recorded_at), col(TrainingRecord.id))))


def coverage(
    session: Session, institution: str, sop_id: str, sop_version: int, roles: set[str], needed: int
) -> list[dict[str, Any]]:
    """Per role that signs in an SOP version: how many active people holding it at the institution
    are trained on exactly that version, against the ``needed`` (the SOP's ``min_trained``), by role.
    ``[{"role", "trained", "needed", "short", "people"}]``, ``people`` the trained users' ids."""
    trained_ids = {
        r.user_id
        for r in session.exec(
            select(TrainingRecord).where(
                TrainingRecord.institution == institution,
                TrainingRecord.sop_id == sop_id,
                TrainingRecord.sop_version == sop_version,
            )
        )
    }
    holders: dict[str, set[str]] = {role: set() for role in roles}
    for g in current_grants(session, institution=institution):
        if g.role in holders and g.user_id in trained_ids:
            holders[g.role].add(g.user_id)
    out: list[dict[str, Any]] = []
    for role in sorted(roles):
        people = sorted(u for u in holders[role] if is_active(session, u))
        out.append(
            {"role": role, "trained": len(people), "needed": needed, "short": len(people) < needed, "people": people}
        )
    return out


def coverage_problem(rows: list[dict[str, Any]], sop_id: str, sop_version: int) -> str | None:
    """Why the version may not turn Effective yet (a role that signs in it has too few trained people), or None."""
    short = [r for r in rows if r["short"]]
    if not short:
        return None
    what = ", ".join(f"{r['role']}: {r['trained']}/{r['needed']}" for r in short)
    return (
        f"{sop_id} v{sop_version} waits to become effective: too few active people trained on it to sign its steps "
        f"(trained/needed: {what}); record their training with `sopflow training grant USER --institution INST "
        f"--sop {sop_id} --version {sop_version} --as <QA officer>`"
    )


def grant_hint(username: str, institution: str, sop_id: str, sop_version: int) -> str:
    return f"sopflow training grant {username} --institution {institution} --sop {sop_id} --version {sop_version}"
