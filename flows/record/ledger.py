"""Stage 3: the only writer of the quality record, and the audit chain over it.

Every row is inserted through :func:`append`, which writes it together with an ``AuditEvent``
carrying the row's canonical content and the previous event's hash. Callers open the
transaction with ``flows.record.db.write_session`` so the chain's head cannot move under them.
Nothing here updates or deletes a row. Must not import prefect.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlmodel import Session, SQLModel, col, select

from flows.record.tables import (
    RECORD_TABLES,
    AuditEvent,
    Signature,
    SopRun,
    StepRecord,
    utcnow,
)

__all__ = [
    "GENESIS",
    "ChainReport",
    "Entry",
    "append",
    "append_many",
    "audit",
    "canonical",
    "row_payload",
    "sha256_hex",
    "signed_content",
    "verify_chain",
    "verify_signature",
]

GENESIS = "0" * 64


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # SQLite hands back naive datetimes; we only ever store UTC
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"cannot put {type(value).__name__} in the record")


def canonical(obj: Any) -> bytes:
    """The one byte form of a value that hashes are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def row_payload(row: SQLModel) -> dict[str, Any]:
    """Every column of a row, as JSON-ready values."""
    mapper = sa_inspect(type(row))
    out: dict[str, Any] = {}
    for column in mapper.columns:
        value = getattr(row, column.key)
        out[column.key] = json.loads(canonical(value)) if isinstance(value, datetime) else value
    return out


def _event_hash(ev: AuditEvent) -> str:
    body = {
        "seq": ev.seq,
        "at": ev.at,
        "actor": ev.actor,
        "action": ev.action,
        "object_type": ev.object_type,
        "object_id": ev.object_id,
        "payload": json.loads(ev.payload_json),
        "reason": ev.reason,
        "prev_hash": ev.prev_hash,
    }
    return sha256_hex(canonical(body))


def audit(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    payload: dict[str, Any],
    reason: str | None = None,
) -> AuditEvent:
    """Append one event to the chain (inside the caller's write transaction)."""
    head = session.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    ev = AuditEvent(
        seq=(head.seq + 1) if head else 1,
        at=utcnow(),
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        payload_json=canonical(payload).decode(),
        reason=reason,
        prev_hash=head.hash if head else GENESIS,
        hash="",
    )
    ev.hash = _event_hash(ev)
    session.add(ev)
    session.flush()
    return ev


def append(
    session: Session, row: SQLModel, *, actor: str, action: str | None = None, reason: str | None = None
) -> SQLModel:
    """Insert a record row and the audit event that carries its content (as ``payload["row"]``)."""
    table = _record_table(row)
    session.add(row)
    session.flush()
    audit(
        session,
        actor=actor,
        action=action or f"{table}.insert",
        object_type=table,
        object_id=str(row.id),  # type: ignore[attr-defined]
        payload={"row": row_payload(row)},
        reason=reason,
    )
    return row


def _record_table(row: SQLModel) -> str:
    """The row's table, once the row is fit for the record (a record table; aware times, stored as UTC)."""
    table = str(row.__tablename__)
    if table not in RECORD_TABLES:
        raise TypeError(f"{type(row).__name__} is not a record table")
    for name in sa_inspect(type(row)).columns.keys():  # noqa: SIM118  (iterating the collection yields Column objects)
        value = getattr(row, name)
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError(f"{table}.{name}: naive datetime; the record stores aware UTC times")
            # SQLite keeps the wall-clock digits and drops the zone: store the UTC instant.
            setattr(row, name, value.astimezone(UTC))
    return table


@dataclass(frozen=True)
class Entry:
    """One write of :func:`append_many`: a record row as :func:`append` writes it, or (``row`` None)
    a row-less event as :func:`audit` writes it (``object_type``, ``object_id``, ``payload``)."""

    actor: str
    action: str | None = None
    row: SQLModel | None = None
    reason: str | None = None
    object_type: str = ""
    object_id: str = ""
    payload: dict[str, Any] = field(default_factory=dict)


def append_many(session: Session, entries: Iterable[Entry]) -> int:
    """Many :func:`append` and :func:`audit` calls at once, in order, inside the caller's write
    transaction: the same rows and the same chain, with one read of the head and one flush (bulk
    writes: a history imported, bench/history.py). Returns the number of events written."""
    head = session.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    seq, prev = (head.seq, head.hash) if head else (0, GENESIS)
    rows: dict[str, list[SQLModel]] = {}
    events: list[AuditEvent] = []
    for e in entries:
        if e.row is not None:
            table = _record_table(e.row)
            rows.setdefault(table, []).append(e.row)
            object_type, object_id = table, str(e.row.id)  # type: ignore[attr-defined]
            action, payload = e.action or f"{table}.insert", {"row": row_payload(e.row)}
        else:
            object_type, object_id, action, payload = e.object_type, e.object_id, e.action or "", e.payload
        seq += 1
        ev = AuditEvent(
            seq=seq,
            at=utcnow(),
            actor=e.actor,
            action=action,
            object_type=object_type,
            object_id=object_id,
            payload_json=canonical(payload).decode(),
            reason=e.reason,
            prev_hash=prev,
            hash="",
        )
        ev.hash = _event_hash(ev)
        prev = ev.hash
        events.append(ev)
    # One multi-row INSERT a table, referenced tables first. The rows are written, not attached to
    # the session (unlike ``append``'s): at this scale the ORM's unit of work would cost most of the time.
    session.flush()
    conn = session.connection()
    for t in SQLModel.metadata.sorted_tables:
        if t.name in rows:
            keys = [c.key for c in sa_inspect(RECORD_TABLES[t.name]).columns]
            conn.execute(t.insert(), [{k: getattr(r, k) for k in keys} for r in rows.pop(t.name)])
    if events:
        keys = [c.key for c in sa_inspect(AuditEvent).columns]
        conn.execute(AuditEvent.__table__.insert(), [{k: getattr(ev, k) for k in keys} for ev in events])  # type: ignore[attr-defined]
    return len(events)


def signed_content(run: SopRun, step_id: str, data: dict[str, Any], sig: Signature) -> dict[str, Any]:
    """Exactly what a signature's hash covers: this run, this SOP text, this step, this data, this signer."""
    return {
        "run_id": run.id,
        "sop_sha256": run.sop_sha256,
        "step_id": step_id,
        "data": data,
        "signer_id": sig.user_id,
        "printed_name": sig.printed_name,
        "meaning": sig.meaning,
        "statement": sig.statement,
        "signed_at": sig.signed_at,
    }


def verify_signature(session: Session, sig: Signature) -> str | None:
    """None when the signature matches the step data it is attached to, else what is wrong."""
    run = session.get(SopRun, sig.run_id)
    if run is None:
        return f"signature {sig.id} names run {sig.run_id}, which does not exist"
    # Every record carrying it (the ``signed`` one and the flow's ``done`` copy) must match it.
    recs = list(session.exec(select(StepRecord).where(StepRecord.signature_id == sig.id).order_by(col(StepRecord.n))))
    if not recs:
        return f"signature {sig.id} is attached to no step record"
    for rec in recs:
        if rec.run_id != sig.run_id or rec.step_id != sig.step_id:
            return f"signature {sig.id} is for {sig.run_id}/{sig.step_id}, attached to {rec.run_id}/{rec.step_id}"
        expected = sha256_hex(canonical(signed_content(run, sig.step_id, json.loads(rec.data_json), sig)))
        if expected != sig.signed_sha256:
            return f"signature {sig.id}: the signed data no longer matches its hash"
    return None


@dataclass
class ChainReport:
    events: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(session: Session, *, limit_problems: int = 20) -> ChainReport:
    """Walk the chain from the first event; name the first break and every row it no longer covers."""
    report = ChainReport()
    prev = GENESIS
    covered: dict[tuple[str, str], dict[str, Any]] = {}
    expected_seq = 1
    for ev in session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))):
        report.events += 1
        if ev.seq != expected_seq:
            report.problems.append(f"audit event {expected_seq} is missing (next is {ev.seq}): an event was deleted")
            expected_seq = ev.seq
        if ev.prev_hash != prev:
            report.problems.append(
                f"audit event {ev.seq}: does not follow event {ev.seq - 1} (prev_hash differs): the chain was edited or reordered here"
            )
        if _event_hash(ev) != ev.hash:
            report.problems.append(f"audit event {ev.seq}: its content does not match its hash: the event was edited")
        payload = json.loads(ev.payload_json)
        if ev.object_type in RECORD_TABLES and isinstance(payload, dict) and "row" in payload:
            covered[(ev.object_type, ev.object_id)] = payload["row"]
        prev = ev.hash
        expected_seq += 1
        if len(report.problems) >= limit_problems:
            return report
    for table, model in RECORD_TABLES.items():
        for row in session.exec(select(model)):
            report.rows += 1
            key = (table, str(row.id))  # type: ignore[attr-defined]
            payload = covered.pop(key, None)
            if payload is None:
                report.problems.append(f"{table} row {key[1]}: not in the audit chain: inserted outside sopflow")
            elif payload != json.loads(canonical(row_payload(row))):
                changed = sorted(k for k, v in row_payload(row).items() if json.loads(canonical(v)) != payload.get(k))
                report.problems.append(f"{table} row {key[1]}: changed since it was recorded ({', '.join(changed)})")
            if len(report.problems) >= limit_problems:
                return report
    for table, row_id in covered:
        report.problems.append(f"{table} row {row_id}: recorded in the audit chain but missing: deleted")
    return report
