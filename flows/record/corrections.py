"""Stage 3: corrections without erasure (EU GMP Annex 11 §9, 21 CFR 11.10(e)).

A signed entry is never changed. A correction is a new signed entry written beside it, in one
write transaction: a ``Signature`` whose meaning is ``corrected`` and whose hash covers the new
data exactly as a submission's does (``ledger.signed_content``), and a ``done`` ``StepRecord``
carrying the new data, the reason, and ``supersedes_id`` = the record it corrects. The newest
record is the step's value; the records it supersedes stay, with their signatures, so the quality
record shows old value, new value, who, when and why.

A correction does not re-run what already used the earlier value (checks, verifications,
documents): :func:`corrections_by_step` names those, so the record says so.

Who may correct, and what counts as a valid value, is decided by the service layer
(``flows.services.signing.correct_step``); this module only writes and reads. Must not import prefect.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from flows.record import ledger
from flows.record.state import next_n
from flows.record.tables import Signature, SopRun, StepRecord, User, utcnow
from flows.sop.model import SopDefinition, VerifyStepSpec

__all__ = ["CORRECTED", "changed_fields", "corrections_by_step", "newest_record", "write_correction"]

CORRECTED = "corrected"
"""The meaning of a correction's signature."""


def newest_record(session: Session, run_id: str, step_id: str) -> StepRecord | None:
    """The newest record of one step (by position, never by clock)."""
    return session.exec(
        select(StepRecord)
        .where(StepRecord.run_id == run_id, StepRecord.step_id == step_id)
        .order_by(col(StepRecord.n).desc())
        .limit(1)
    ).first()


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{field: {"old": …, "new": …}}`` for every field whose value differs."""
    return {k: {"old": old.get(k), "new": new.get(k)} for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def write_correction(
    session: Session,
    run: SopRun,
    corrected: StepRecord,
    data: dict[str, Any],
    user: User,
    reason: str,
    statement: str | None,
) -> StepRecord:
    """Append the corrector's signature over ``data`` and the ``done`` record superseding ``corrected``.

    Call inside a write session; the caller has checked the corrector and the values.
    """
    sig = Signature(
        run_id=run.id,
        step_id=corrected.step_id,
        user_id=user.id,
        printed_name=user.printed_name,
        meaning=CORRECTED,
        statement=statement,
        signed_at=utcnow(),
        signed_sha256="",
    )
    sig.signed_sha256 = ledger.sha256_hex(ledger.canonical(ledger.signed_content(run, corrected.step_id, data, sig)))
    ledger.append(session, sig, actor=user.id, action="signature.create", reason=reason)
    rec = StepRecord(
        run_id=run.id,
        n=next_n(session, StepRecord, run.id),
        step_id=corrected.step_id,
        kind=corrected.kind,
        status="done",
        data_json=ledger.canonical(data).decode(),
        actor_id=user.id,
        signature_id=sig.id,
        supersedes_id=corrected.id,
        reason=reason,
        at=utcnow(),
    )
    ledger.append(session, rec, actor=user.id, action="step.corrected", reason=reason)
    return rec


def _used_earlier_value(rec: StepRecord, step_id: str, sop: SopDefinition) -> bool:
    """Whether ``rec`` is a step that used ``step_id``'s data when it ran (and a correction does not re-run)."""
    if rec.step_id == step_id or rec.status not in ("done", "failed"):
        return False
    if rec.kind in ("check", "document"):
        return True
    if rec.kind == "verify":
        try:
            spec = sop.step(rec.step_id)
        except KeyError:
            return False
        return isinstance(spec, VerifyStepSpec) and spec.of == step_id
    return False


def corrections_by_step(records: list[StepRecord], sop: SopDefinition) -> dict[str, list[dict[str, Any]]]:
    """Every correction of a run, by step, oldest first: what changed, by whom, when, why.

    ``records`` are the run's step records in order. ``not_rerun`` names the checks, documents
    and verifications of this step that ran on an earlier value before the correction.
    """
    by_id = {r.id: r for r in records}
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec.supersedes_id is None:
            continue
        prev = by_id.get(rec.supersedes_id)
        first = prev
        while first is not None and first.supersedes_id is not None:  # the entry the chain of corrections began with
            first = by_id.get(first.supersedes_id)
        start = first.n if first is not None else 0
        not_rerun: list[dict[str, str]] = []
        for other in records:
            if (
                start < other.n < rec.n
                and _used_earlier_value(other, rec.step_id, sop)
                and all(o["step_id"] != other.step_id for o in not_rerun)
            ):
                not_rerun.append({"step_id": other.step_id, "kind": other.kind})
        old = json.loads(prev.data_json) if prev is not None else {}
        out.setdefault(rec.step_id, []).append(
            {
                "record_id": rec.id,
                "supersedes": rec.supersedes_id,
                "n": rec.n,
                "at": rec.at,
                "actor_id": rec.actor_id,
                "reason": rec.reason,
                "signature_id": rec.signature_id,
                "changes": changed_fields(old, json.loads(rec.data_json)),
                "not_rerun": not_rerun,
            }
        )
    return out
