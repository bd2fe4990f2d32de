"""Stage 3: the only writer of the quality record, and the audit chain over it.

Every row is inserted through :func:`append`, which writes it together with an ``AuditEvent``
carrying the row's canonical content and the previous event's hash. Callers open the
transaction with ``flows.record.db.write_session`` so the chain's head cannot move under them.
Nothing here updates or deletes a row. Must not import prefect.

Hashes survive schema upgrades. An event's hash covers its stored ``payload_json``, and a row's
payload (``row_payload``) holds the row's columns *as they were when it was written*: the event
itself records which columns it covered. When a migration adds a column later, old rows' events do
not name it, and nothing is recomputed: ``row_changes`` compares a row with its event over the
columns the event names, and a column the event does not name must still hold the value the
migration gave old rows (``Column(info={"backfill": value})``, NULL when not declared). So an
upgrade leaves every hash and every ``audit verify`` verdict as it was, and setting a new column on
an old row behind sopflow's back is still caught. ``_event_hash`` names its fields one by one, so a
column added to ``sf_audit`` later is outside old events' hashes too; to cover such a column, put it
in the hashed body only when it is set, so that old events' bodies, and hashes, stay as they were.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, func, type_coerce
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select as sa_select
from sqlmodel import Session, SQLModel, col, select

from flows.record import current
from flows.record.tables import (
    RECORD_TABLES,
    AuditEvent,
    Signature,
    SopRun,
    StepRecord,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "GENESIS",
    "ChainReport",
    "Entry",
    "Progress",
    "append",
    "append_many",
    "audit",
    "canonical",
    "row_changes",
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


def row_changes(recorded: dict[str, Any], row: SQLModel) -> list[str]:
    """The columns of ``row`` that differ from what its event recorded, sorted ([] when it matches).

    Compared over the columns the event names; a column it does not name was added after the row was
    written and matches only while it holds its backfill value (``column.info["backfill"]``, else NULL)."""
    live = json.loads(canonical(row_payload(row)))
    columns = {c.key: c for c in sa_inspect(type(row)).columns}
    changed = {k for k, v in recorded.items() if k not in live or live[k] != v}
    for key, value in live.items():
        if key not in recorded and value != json.loads(canonical(columns[key].info.get("backfill"))):
            changed.add(key)
    return sorted(changed)


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
    """Insert a record row and the audit event that carries its content (as ``payload["row"]``), and
    bring the current-state tables up to date with it (``flows.record.current``)."""
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
    current.apply(session, row)  # the current state moves in the same transaction (flows.record.current)
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
    transaction: the same rows, the same chain and the same current state, with one read of the head (bulk
    writes: a history imported, bench/history.py). Returns the number of events written."""
    head = session.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    seq, prev = (head.seq, head.hash) if head else (0, GENESIS)
    rows: dict[str, list[SQLModel]] = {}
    in_order: list[SQLModel] = []
    events: list[AuditEvent] = []
    for e in entries:
        if e.row is not None:
            table = _record_table(e.row)
            rows.setdefault(table, []).append(e.row)
            in_order.append(e.row)
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
    for row in in_order:  # the current state moves with the record, as append moves it
        current.apply(session, row)
    session.flush()
    return len(events)


def signed_content(run: SopRun, step_id: str, data: dict[str, Any], sig: Signature) -> dict[str, Any]:
    """Exactly what a signature's hash covers: this run, this SOP text, this step, this data, this signer."""
    return _signed_dict(
        run.id, run.sop_sha256, step_id, data, sig.user_id, sig.printed_name, sig.meaning, sig.statement, sig.signed_at
    )


def _signed_dict(
    run_id: str,
    sop_sha256: str,
    step_id: str,
    data: Any,
    signer_id: str,
    printed_name: str,
    meaning: str,
    statement: str | None,
    signed_at: Any,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "sop_sha256": sop_sha256,
        "step_id": step_id,
        "data": data,
        "signer_id": signer_id,
        "printed_name": printed_name,
        "meaning": meaning,
        "statement": statement,
        "signed_at": signed_at,
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


Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: how far a verification is (``audit verify`` draws a bar)."""


@dataclass
class ChainReport:
    """What ``verify_chain`` (and ``flows.record.checkpoints.verify_checkpoints``) found.

    ``head`` is the live chain's last event ``(seq, hash)``; ``start`` the event an incremental
    walk began after (0 for a full one); ``notes`` say what holds but is worth knowing (events the
    newest checkpoint does not cover yet); ``problems`` what does not hold, each naming the event,
    row, signature or checkpoint."""

    events: int = 0
    rows: int = 0
    signatures: int = 0
    checkpoints: int = 0
    head: tuple[int, str] | None = None
    start: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limit: int = 20

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def full(self) -> bool:
        return len(self.problems) >= self.limit

    def problem(self, text: str) -> None:
        if not self.full:
            self.problems.append(text)


_PROGRESS_EVERY = 20_000


_js = json.encoder.encode_basestring
"""A str as ``canonical`` writes it (JSON's own C function: no encoder built per call)."""
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default).encode
"""``canonical`` as str, with one encoder made once (``json.dumps`` makes one per call)."""


def _at_iso(at: datetime | str) -> str:
    """An event or row time as ``canonical`` writes it. ``at`` is a datetime, or on SQLite the
    stored text (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), read raw because parsing it costs more
    than the rest of an event's check; anything else is parsed."""
    if isinstance(at, str):
        if len(at) == 26 and at[10] == " " and at[19] == ".":
            return f"{at[:10]}T{at[11:19]}{'' if at[20:] == '000000' else at[19:]}+00:00"
        at = datetime.fromisoformat(at)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _at_datetime(at: datetime | str) -> datetime:
    value = datetime.fromisoformat(at) if isinstance(at, str) else at
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _event_hash_fast(
    seq: int,
    at: datetime | str,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    payload_json: str,
    reason: str | None,
    prev_hash: str,
) -> str:
    """``_event_hash`` without parsing and re-serialising the payload: the same bytes whenever
    ``payload_json`` is canonical, as ``audit`` writes it (the keys in sorted order, each string
    JSON-escaped by the C function ``canonical`` uses). A mismatch is re-checked by ``_event_hash`` itself, so this only ever speeds up a verdict
    (tests/test_audit_tamper.py pins it)."""
    body = (
        f'{{"action":{_js(action)},"actor":{_js(actor)},"at":"{_at_iso(at)}","object_id":{_js(object_id)},'
        f'"object_type":{_js(object_type)},"payload":{payload_json},"prev_hash":{_js(prev_hash)},'
        f'"reason":{"null" if reason is None else _js(reason)},"seq":{int(seq)}}}'
    )
    return hashlib.sha256(body.encode()).hexdigest()


@functools.cache
def _members(keys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Each key of a row (in sorted order) with its start in ``canonical``'s form, ``"key":``:
    worked out once per table, not once per row."""
    return tuple((k, f"{_js(k)}:") for k in sorted(keys))


def _flat_canonical(keys: tuple[str, ...], values: dict[str, Any]) -> str:
    """``canonical`` of a row's columns (str, int, float, bool, None), ``keys`` those of ``values``."""
    parts = []
    for k, member in _members(keys):
        v = values[k]
        if v is None:
            text = "null"
        elif v is True:
            text = "true"
        elif v is False:
            text = "false"
        elif type(v) is str:
            text = _js(v)
        elif type(v) is int:
            text = int.__repr__(v)
        else:
            text = _CANONICAL(v)
        parts.append(member + text)
    return "{" + ",".join(parts) + "}"


def _raw_times(session: Session, columns: Any) -> list[Any]:
    """The columns to select, the record's times as text in SQLite's stored form (``_at_iso``):
    on SQLite the stored text itself; on PostgreSQL the UTC instant printed by the server
    (``to_char``), which costs less than the driver's datetime, its zone and ``isoformat``
    (a third of an event's check)."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return [type_coerce(c, String()).label(c.key) if isinstance(c.type, UTCDateTime) else c for c in columns]
    if dialect == "postgresql":
        return [
            func.to_char(func.timezone("UTC", c), "YYYY-MM-DD HH24:MI:SS.US").label(c.key)
            if isinstance(c.type, UTCDateTime)
            else c
            for c in columns
        ]
    return list(columns)


def _stream(session: Session, statement: Any) -> Iterator[Any]:
    """Rows of a Core statement, fetched in batches (a server-side cursor on PostgreSQL)."""
    conn = session.connection()
    result = conn.execution_options(stream_results=True, yield_per=5000).execute(statement)
    for partition in result.partitions():
        yield from partition


def _ordered(column: Any, session: Session) -> Any:
    """``column`` ordered as Python orders str (code points): ``COLLATE "C"`` on PostgreSQL."""
    return column.collate("C") if session.get_bind().dialect.name == "postgresql" else column


def verify_chain(
    session: Session,
    *,
    limit_problems: int = 20,
    after: tuple[int, str] | None = None,
    progress: Progress | None = None,
) -> ChainReport:
    """Walk the chain, then every record row and every signature against it, streaming: memory
    stays flat however long the history. Names the first break, every row the chain no longer
    covers, and every signature whose hash no longer matches what it signed.

    ``after=(seq, hash)`` walks only what follows a verified checkpoint: the event ``seq`` must
    still carry ``hash``, the events after it must chain on from it, and the rows, signatures
    those events recorded must match them (rows recorded before are left to a full walk).
    Read in one snapshot (PostgreSQL: REPEATABLE READ), so concurrent writers never look like tampering.
    """
    report = ChainReport(limit=limit_problems)
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    ev_t = AuditEvent.__table__  # type: ignore[attr-defined]
    head = session.execute(sa_select(ev_t.c.seq, ev_t.c.hash).order_by(ev_t.c.seq.desc()).limit(1)).first()
    report.head = (int(head[0]), str(head[1])) if head else None
    start, prev = 0, GENESIS
    if after is not None:
        start, prev = after
        report.start = start
        # Core, not the ORM: the first ORM read configures every mapper (~50 ms of a command's start).
        anchor = session.execute(_event_columns(session).where(ev_t.c.seq == start)).first()
        if anchor is None:
            report.problem(f"audit event {start}, which the verified checkpoint covers, is gone: events were removed")
            return report
        if anchor[-1] != prev or not _hash_holds(*anchor):
            report.problem(
                f"audit event {start} no longer has the hash the verified checkpoint signed: the chain was rewritten"
            )
            return report
    _walk_events(session, report, start, prev, progress)
    if report.full:
        return report
    if after is None:
        _walk_rows(session, report, progress)
    else:
        _rows_since(session, report, start)
    if not report.full:
        _walk_signatures(session, report, start, progress)
    return report


def _event_columns(session: Session) -> Any:
    """A select of what an event's hash covers and its stored hash, in ``_hash_holds``'s order (times raw)."""
    ev_t = AuditEvent.__table__  # type: ignore[attr-defined]
    return sa_select(
        *_raw_times(
            session,
            (
                ev_t.c.seq,
                ev_t.c.at,
                ev_t.c.actor,
                ev_t.c.action,
                ev_t.c.object_type,
                ev_t.c.object_id,
                ev_t.c.payload_json,
                ev_t.c.reason,
                ev_t.c.prev_hash,
                ev_t.c.hash,
            ),
        )
    )


def _hash_holds(
    seq: int,
    at: datetime | str,
    actor: str,
    action: str,
    otype: str,
    oid: str,
    payload_json: str,
    reason: str | None,
    prev_hash: str,
    stored: str,
) -> bool:
    """Whether an event's content (as ``_event_columns`` reads it) still hashes to ``stored``: the quick
    form first, the event rebuilt and hashed by ``_event_hash`` only when that differs."""
    if _event_hash_fast(seq, at, actor, action, otype, oid, payload_json, reason, prev_hash) == stored:
        return True
    ev = AuditEvent(
        seq=seq,
        at=_at_datetime(at),
        actor=actor,
        action=action,
        object_type=otype,
        object_id=oid,
        payload_json=payload_json,
        reason=reason,
        prev_hash=prev_hash,
        hash=stored,
    )
    return _event_hash(ev) == stored


def _walk_events(session: Session, report: ChainReport, start: int, prev: str, progress: Progress | None) -> None:
    ev_t = AuditEvent.__table__  # type: ignore[attr-defined]
    total = report.head[0] - start if report.head else 0
    expected = start + 1
    q = _event_columns(session).where(ev_t.c.seq > start)
    for seq, at, actor, action, otype, oid, payload_json, reason, prev_hash, stored in _stream(
        session, q.order_by(ev_t.c.seq)
    ):
        report.events += 1
        if seq != expected:
            report.problem(f"audit event {expected} is missing (next is {seq}): an event was deleted")
            expected = seq
        if prev_hash != prev:
            report.problem(
                f"audit event {seq}: does not follow event {seq - 1} (prev_hash differs): the chain was edited or reordered here"
            )
        if _event_hash_fast(seq, at, actor, action, otype, oid, payload_json, reason, prev_hash) != stored and not (
            _hash_holds(seq, at, actor, action, otype, oid, payload_json, reason, prev_hash, stored)
        ):  # the quick form inline (a call per event is ~1 s of 3.4 million), the slow one only on a mismatch
            report.problem(f"audit event {seq}: its content does not match its hash: the event was edited")
        prev = stored
        expected += 1
        if report.full:
            return
        if progress is not None and report.events % _PROGRESS_EVERY == 0:
            progress("events", report.events, total)
    if progress is not None:
        progress("events", report.events, total)


def _recorded_row(payload_json: str) -> dict[str, Any] | None:
    payload = json.loads(payload_json)
    row = payload.get("row") if isinstance(payload, dict) else None
    return row if isinstance(row, dict) else None


def _row_problem(
    session: Session, table: str, row_id: str, payload_json: str, values: dict[str, Any], times: frozenset[str]
) -> str | None:
    """None when a row still equals what its event recorded (``payload_json``), else what changed.
    The quick test: the event's payload is exactly ``{"row": <the row's columns, canonical>}``, as
    ``append`` writes it; anything else is judged by ``row_payload`` against the parsed payload.
    ``values`` (the caller's, read for this call) gets its times in ``canonical``'s form."""
    quick = values
    for k in times:
        if quick[k] is not None:
            quick[k] = _at_iso(quick[k])
    try:
        if payload_json == f'{{"row":{_flat_canonical(tuple(quick), quick)}}}':
            return None
    except TypeError:  # a column type canonical() does not know: the slow path says what it is
        pass
    recorded = _recorded_row(payload_json) or {}
    row = session.get(RECORD_TABLES[table], row_id)
    if row is None:  # pragma: no cover - it was just read in the same snapshot
        return f"{table} row {row_id}: recorded in the audit chain but missing: deleted"
    # Over the columns the event names; a column added since must hold its backfill value (row_changes).
    changed = row_changes(recorded, row)
    if not changed:
        return None
    return f"{table} row {row_id}: changed since it was recorded ({', '.join(changed)})"


def _walk_rows(session: Session, report: ChainReport, progress: Progress | None) -> None:
    """Every row of every record table against the last event that recorded it: a merge of two
    streams ordered by id, so nothing but the current row and event is held. The events of every
    record table come in one stream, table by table (one read of the chain, not one a table: on
    PostgreSQL each was a scan of every event and a sort, since the order is ``COLLATE "C"``)."""
    ev_t = AuditEvent.__table__  # type: ignore[attr-defined]
    every = _stream(
        session,
        sa_select(ev_t.c.object_type, ev_t.c.object_id, ev_t.c.payload_json)
        .where(ev_t.c.object_type.in_(sorted(RECORD_TABLES)))
        .order_by(_ordered(ev_t.c.object_type, session), _ordered(ev_t.c.object_id, session), ev_t.c.seq),
    )
    groups = itertools.groupby(every, key=lambda ev: str(ev[0]))
    group = next(groups, None)
    for table in sorted(RECORD_TABLES):  # the stream's order: Python's str order is "C"'s
        model = RECORD_TABLES[table]
        tt = model.__table__  # type: ignore[attr-defined]
        keys = [c.key for c in tt.columns]
        times = frozenset(c.key for c in tt.columns if isinstance(c.type, UTCDateTime))
        rows = _stream(session, sa_select(*_raw_times(session, tt.columns)).order_by(_ordered(tt.c.id, session)))
        recorded = group is not None and group[0] == table  # some of its rows were recorded
        events: Iterator[tuple[Any, Any]] = iter(())
        if recorded and group is not None:
            events = ((oid, payload_json) for _, oid, payload_json in group[1])
        row = next(rows, None)
        pending: tuple[str, str] | None = None  # (object id, the payload of the last event that recorded its row)
        for oid, payload_json in itertools.chain(events, [(None, None)]):
            if pending is not None and oid != pending[0]:
                # pending's events are all seen: match it with the rows up to its id
                while row is not None and str(row.id) < pending[0]:
                    report.rows += 1
                    report.problem(f"{table} row {row.id}: not in the audit chain: inserted outside sopflow")
                    row = next(rows, None)
                if row is not None and str(row.id) == pending[0]:
                    report.rows += 1
                    if problem := _row_problem(
                        session, table, pending[0], pending[1], dict(zip(keys, row, strict=True)), times
                    ):
                        report.problem(problem)
                    row = next(rows, None)
                else:
                    report.problem(f"{table} row {pending[0]}: recorded in the audit chain but missing: deleted")
                pending = None
                if report.full:
                    return
            if oid is None:
                break
            if payload_json.startswith('{"row":{') or _recorded_row(payload_json) is not None:
                pending = (str(oid), payload_json)
        while row is not None:
            report.rows += 1
            report.problem(f"{table} row {row.id}: not in the audit chain: inserted outside sopflow")
            row = next(rows, None)
            if report.full:
                return
        if recorded:
            group = next(groups, None)  # groupby skips what of this table's events is left
        if progress is not None:
            progress("rows", report.rows, 0)


_BATCH = 500
"""Ids in one ``IN (...)`` of an incremental walk."""


def _batches(ids: list[str]) -> Iterator[list[str]]:
    """``ids`` in slices of at most ``_BATCH``, one ``IN (...)`` each."""
    for i in range(0, len(ids), _BATCH):
        yield ids[i : i + _BATCH]


def _since(query: Any, start: int) -> Any:
    """``query`` over the events after ``start``, by the primary key alone. A filter on the object type
    is left to the caller: beside it, SQLite takes the (object_type, object_id) index and reads every
    such event ever recorded (an incremental walk grew with history: 1.0 s at 1k runs, 1.9 s at 10k)."""
    return query.where(AuditEvent.__table__.c.seq > start)  # type: ignore[attr-defined]


def _rows_since(session: Session, report: ChainReport, start: int) -> None:
    """The rows the events after ``start`` recorded, each against its event. The rows are read
    by table, ``_BATCH`` ids a statement (one statement a row cost ~0.5 ms each on PostgreSQL:
    most of an incremental walk of ~1,350 events)."""
    ev_t = AuditEvent.__table__  # type: ignore[attr-defined]
    q = _since(sa_select(ev_t.c.object_type, ev_t.c.object_id, ev_t.c.payload_json), start).order_by(ev_t.c.seq)
    recorded = [
        (table, str(oid), payload_json)
        for table, oid, payload_json in session.execute(q)
        if table in RECORD_TABLES and _recorded_row(payload_json) is not None
    ]
    wanted: dict[str, set[str]] = {}
    for table, oid, _ in recorded:
        wanted.setdefault(table, set()).add(oid)
    live: dict[tuple[str, str], dict[str, Any]] = {}
    times: dict[str, frozenset[str]] = {}
    for table, ids in wanted.items():
        tt = RECORD_TABLES[table].__table__  # type: ignore[attr-defined]
        keys = [c.key for c in tt.columns]
        times[table] = frozenset(c.key for c in tt.columns if isinstance(c.type, UTCDateTime))
        for batch in _batches(sorted(ids)):
            for found in session.execute(sa_select(tt).where(tt.c.id.in_(batch))):
                row = dict(zip(keys, found, strict=True))
                live[(table, str(row["id"]))] = row
    for table, oid, payload_json in recorded:
        values = live.get((table, oid))
        report.rows += 1
        if values is None:  # read in the same snapshot as the events: it is gone
            report.problem(f"{table} row {oid}: recorded in the audit chain but missing: deleted")
        elif problem := _row_problem(
            session,
            table,
            oid,
            payload_json,
            values,
            times[table],
        ):
            report.problem(problem)
        if report.full:
            return


def _signatures_since(session: Session, start: int) -> tuple[set[str], set[str]]:
    """The signatures the events after ``start`` recorded, or recorded a step record carrying, and
    the runs those signatures and step records belong to: (signature ids, run ids)."""
    ev_t, rec, sig = AuditEvent.__table__, StepRecord.__table__, Signature.__table__  # type: ignore[attr-defined]
    sigs: list[str] = []
    records: list[str] = []
    for otype, oid in session.execute(_since(sa_select(ev_t.c.object_type, ev_t.c.object_id), start)):
        if otype == "sf_signature":
            sigs.append(oid)
        elif otype == "sf_step_record":
            records.append(oid)
    ids: set[str] = set()
    runs: set[str] = set()
    for batch in _batches(sigs):
        for sid, run_id in session.execute(sa_select(sig.c.id, sig.c.run_id).where(sig.c.id.in_(batch))):
            ids.add(sid)
            runs.add(run_id)
    for batch in _batches(records):
        carried = sa_select(rec.c.signature_id, rec.c.run_id).where(
            rec.c.id.in_(batch), rec.c.signature_id.is_not(None)
        )
        for sid, run_id in session.execute(carried):
            ids.add(sid)
            runs.add(run_id)
    return ids, runs


def _walk_signatures(session: Session, report: ChainReport, start: int, progress: Progress | None) -> None:
    """Every signature's hash against what it signed: its run, that run's SOP text, its step, the
    data of every step record carrying it, the signer, printed name, meaning, statement and time.
    An incremental walk checks the signatures the events after ``start`` recorded."""
    sig, run, rec = Signature.__table__, SopRun.__table__, StepRecord.__table__  # type: ignore[attr-defined]

    def rows(records_on: Any) -> Any:
        """Each signature with its run and every step record ``records_on`` joins to it."""
        return (
            sa_select(
                sig.c.id,
                sig.c.run_id,
                sig.c.step_id,
                sig.c.user_id,
                sig.c.printed_name,
                sig.c.meaning,
                sig.c.statement,
                sig.c.signed_at,
                sig.c.signed_sha256,
                run.c.id,
                run.c.sop_sha256,
                rec.c.id,
                rec.c.run_id,
                rec.c.step_id,
                rec.c.data_json,
            )
            .select_from(sig.outerjoin(run, run.c.id == sig.c.run_id).outerjoin(rec, records_on))
            .order_by(sig.c.id, rec.c.n)
        )

    found: Iterable[Any]
    if start:
        # By the ids the new events name, in index lookups: an OR across the join scanned every
        # signature, and a join on signature_id alone (it has no index) every step record ever
        # written. A step record carrying a new signature is new itself, so its run is in ``runs``.
        ids, runs = _signatures_since(session, start)
        q = rows((rec.c.signature_id == sig.c.id) & rec.c.run_id.in_(sorted(runs)))
        new_sigs = sorted(ids)
        found = itertools.chain.from_iterable(session.execute(q.where(sig.c.id.in_(b))) for b in _batches(new_sigs))
    else:
        found = _stream(session, rows(rec.c.signature_id == sig.c.id))
    last: str | None = None
    for (
        sid,
        run_id,
        step_id,
        user_id,
        name,
        meaning,
        statement,
        signed_at,
        sha,
        found_run,
        sop_sha,
        rec_id,
        rec_run,
        rec_step,
        data_json,
    ) in found:
        if sid != last:
            report.signatures += 1
            last = sid
        elif report.problems and report.problems[-1].startswith(f"signature {sid}"):
            continue  # one problem per signature
        if found_run is None:
            report.problem(f"signature {sid} names run {run_id}, which does not exist")
        elif rec_id is None:
            report.problem(f"signature {sid} is attached to no step record")
        elif rec_run != run_id or rec_step != step_id:
            report.problem(f"signature {sid} is for {run_id}/{step_id}, attached to {rec_run}/{rec_step}")
        else:
            signed = _signed_dict(
                run_id, sop_sha, step_id, json.loads(data_json), user_id, name, meaning, statement, signed_at
            )
            if sha256_hex(canonical(signed)) != sha:
                report.problem(
                    f"signature {sid}: the signed data no longer matches its hash (step record {rec_id}, {run_id}/{step_id})"
                )
        if report.full:
            return
    if progress is not None:
        progress("signatures", report.signatures, 0)
