"""Stage 3: the evidence an exported quality record carries, for ``flows.record.export`` to check.

``run_evidence`` gathers a run's rows exactly as stored (``rows``: table -> list of rows, as the
audit chain recorded them) and every audit event that recorded one of them or concerns the run
(``audit_events``: refused signatures and corrections are events on the run). User rows are left
out: their events carry password hashes. Must not import prefect.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from flows.record.ledger import canonical, row_payload
from flows.record.tables import (
    AuditEvent,
    Deviation,
    DeviationEvent,
    Document,
    Escalation,
    RunEvent,
    Signature,
    SopRun,
    SopVersion,
    StepRecord,
)

__all__ = ["run_evidence"]


def _json_ready(value: Any) -> Any:
    return json.loads(canonical(value))


def run_evidence(session: Session, run: SopRun) -> dict[str, Any]:
    """``{"rows": {table: [row, …]}, "audit_events": [event, …]}`` for one run, events in chain order."""
    rows: dict[str, list[dict[str, Any]]] = {"sf_run": [_json_ready(row_payload(run))]}
    version = session.get(SopVersion, run.sop_version_id)
    if version is not None:
        rows["sf_sop_version"] = [_json_ready(row_payload(version))]
    order = {
        RunEvent: RunEvent.n,
        StepRecord: StepRecord.n,
        Signature: Signature.signed_at,
        Deviation: Deviation.opened_at,
        Document: Document.rendered_at,
        Escalation: Escalation.at,
        DeviationEvent: DeviationEvent.at,
    }
    for model, key in order.items():
        found: Any = session.exec(
            select(model).where(model.run_id == run.id).order_by(col(key), col(model.id))  # type: ignore[arg-type, attr-defined]
        )
        rows[model.__tablename__] = [_json_ready(row_payload(r)) for r in found]  # type: ignore[attr-defined]
    ids = {str(r["id"]) for table_rows in rows.values() for r in table_rows}
    events = []
    for ev in session.exec(select(AuditEvent).where(col(AuditEvent.object_id).in_(ids)).order_by(col(AuditEvent.seq))):
        if (ev.object_type, ev.object_id) == ("sf_run", run.id) or ev.object_type in rows:
            events.append(
                {
                    "seq": ev.seq,
                    "at": _json_ready(ev.at),
                    "actor": ev.actor,
                    "action": ev.action,
                    "object_type": ev.object_type,
                    "object_id": ev.object_id,
                    "payload": json.loads(ev.payload_json),
                    "reason": ev.reason,
                    "prev_hash": ev.prev_hash,
                    "hash": ev.hash,
                }
            )
    return {"rows": rows, "audit_events": events}
