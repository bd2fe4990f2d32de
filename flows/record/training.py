"""Stage 3: training records (21 CFR 11.10(i)): who is trained on which SOP revision, where.

A ``TrainingRecord`` is append-only like every record row. ``state.signer_problem`` asks
``is_trained`` before anyone signs a step: the signer must be trained on exactly the SOP id and
version the run uses, at the run's institution. Must not import prefect.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from flows.record import ledger
from flows.record.tables import TrainingRecord, User, utcnow

__all__ = ["grant_hint", "is_trained", "record_training", "training_records"]


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


def grant_hint(username: str, institution: str, sop_id: str, sop_version: int) -> str:
    return f"sopflow training grant {username} --institution {institution} --sop {sop_id} --version {sop_version}"
