"""bench/history.py's history: N finished runs and the open ones, replayed from the template
(bench/history_template.py) through the record's own writer, ``flows.record.ledger``.

The template's audit chain is split into its base (staff, roles, training, the SOP versions: copied
once, ids kept) and its runs: each run is the window of events from its start (and the sign-in
before it) to its last event, sign-ins, refusals and outbox deliveries included. A replayed run is
that window again, every row through ``ledger.append`` and every row-less event through
``ledger.audit``, with

- fresh ids for every row, flow run and task run of the window (wherever they appear: keys,
  links, message bodies), and a fresh COI and lot (a storage check: one of four tanks);
- every time moved so the run starts at its place in the history (finished runs one every
  ``SPACING`` into the past; open runs within the last hours);
- every signature's hash computed again over what it signs now (``ledger.signed_content``: the
  run's new id, the moved signing time), so ``audit verify`` checks out.

Open runs are the accepted receipt cut before a human step is signed: waiting at ``arrival``
(cell lab) or ``identity_verification`` (pharmacist), with the waiting message delivered.
Runs are written in transactions of ``CHUNK`` runs (``flows.record.db.write_session``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

CHUNK = 100
SPACING = timedelta(minutes=10)
"""Finished runs start one every 10 minutes into the past: 100,000 runs are about two years."""
MIX = ("accepted",) * 11 + ("rejected",) + ("storage",) * 8
"""Of every 20 finished runs: 11 accepted receipts, 1 rejected (a deviation), 8 daily storage checks."""
OPEN_STEPS = ("arrival", "identity_verification")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Op:
    """One write of the template: a row (``table``) or a row-less audit event."""

    table: str | None
    values: dict[str, Any]
    """Column values (row), or the audit event's object_type, object_id and payload (row-less)."""
    actor: Any
    action: str
    reason: Any


@dataclass
class Bundle:
    """One template run (or a prefix of one), compiled for replay."""

    kind: str
    ops: list[Op]
    tokens: list[str]
    """What is fresh in every copy: ids, the COI, the lot, the tank."""
    started_at: datetime
    sig_data: dict[str, Any] = field(default_factory=dict)
    """Signature id (template) -> the data_json of the record it signed (compiled)."""


def _compile(value: Any, pattern: re.Pattern[str] | None) -> Any:
    """A string holding tokens as a tuple of parts (literal, then index, then literal...)."""
    if not isinstance(value, str) or pattern is None:
        return value
    parts = pattern.split(value)
    if len(parts) == 1:
        return value
    return ("\0parts", *parts)


def _render(value: Any, fresh: dict[str, str], shift: timedelta) -> Any:
    if isinstance(value, tuple) and value and value[0] == "\0parts":
        parts = value[1:]
        return "".join(p if i % 2 == 0 else fresh[p] for i, p in enumerate(parts))
    if isinstance(value, datetime):
        return value + shift
    return value


def load_template(db_path: str) -> tuple[list[Op], dict[str, Bundle], list[tuple[bytes]]]:
    """The template's base ops, its bundles (``accepted``, ``rejected``, ``storage``, ``open:<step>``)
    and its documents' bytes."""
    from sqlalchemy import inspect as sa_inspect
    from sqlmodel import Session, col, create_engine, select

    from flows.record.tables import RECORD_TABLES, AuditEvent, DocumentContent, OutboxMessage, SopRun

    engine = create_engine(f"sqlite:///{db_path}")
    with Session(engine) as s:
        events = list(s.exec(select(AuditEvent).order_by(col(AuditEvent.seq))))
        runs = {r.id: r for r in s.exec(select(SopRun))}
        msg_run = {m.id: m.run_id for m in s.exec(select(OutboxMessage))}

        def row_of(ev: AuditEvent) -> Any:
            model = RECORD_TABLES.get(ev.object_type)
            if model is None or '"row"' not in ev.payload_json:
                return None
            return s.get(model, ev.object_id)

        def owner(ev: AuditEvent, row: Any) -> str | None:
            if row is not None:
                if isinstance(row, SopRun):
                    return str(row.id)
                run_id = getattr(row, "run_id", None) or msg_run.get(getattr(row, "message_id", ""))
                return str(run_id) if run_id in runs else None
            text = f"{ev.object_id} {ev.payload_json}"
            return next((r for r in runs if r in text), None)

        rows = [row_of(ev) for ev in events]
        owners = [owner(ev, row) for ev, row in zip(events, rows, strict=True)]
        windows: dict[str, tuple[int, int]] = {}
        for i, run_id in enumerate(owners):
            if run_id is not None:
                a, b = windows.get(run_id, (i, i))
                windows[run_id] = (min(a, i), max(b, i))
        for run_id, (a, b) in list(windows.items()):  # the starter's sign-in just before run.start
            if a > 0 and events[a - 1].action == "auth.ok" and owners[a - 1] is None:
                windows[run_id] = (a - 1, b)
        in_window = {i for a, b in windows.values() for i in range(a, b + 1)}

        def op(ev: AuditEvent, row: Any) -> Op:
            if row is None:
                values = {"object_type": ev.object_type, "object_id": ev.object_id, "payload": ev.payload_json}
                return Op(None, values, ev.actor, ev.action, ev.reason)
            values = {c.key: getattr(row, c.key) for c in sa_inspect(type(row)).columns}
            return Op(str(row.__tablename__), values, ev.actor, ev.action, ev.reason)

        base = [op(ev, rows[i]) for i, ev in enumerate(events) if i not in in_window]
        bundles: dict[str, Bundle] = {}
        for run_id, (a, b) in windows.items():
            run = runs[run_id]
            if run.sop_id == "storage_daily_check":
                kind = "storage"
            else:
                final = [ev.action for ev in events[a : b + 1] if ev.action.startswith("run.")][-1]
                kind = "accepted" if final == "run.completed" else "rejected"
            ops = [op(events[i], rows[i]) for i in range(a, b + 1)]
            bundles[kind] = _bundle(kind, run, ops)
            if kind == "accepted":
                for step in OPEN_STEPS:
                    bundles[f"open:{step}"] = _bundle(f"open:{step}", run, _prefix(ops, run_id, step))
        docs = [(d.content,) for d in s.exec(select(DocumentContent))]
    engine.dispose()
    return base, bundles, docs


def _prefix(ops: list[Op], run_id: str, step: str) -> list[Op]:
    """The run until someone signs in to sign ``step``, and the deliveries of messages queued by then."""
    cut = next(
        i
        for i, o in enumerate(ops)
        if o.table is None and o.action == "auth.ok" and f"{run_id}/{step}" in o.values["payload"]
    )
    queued = {o.values["id"] for o in ops[:cut] if o.table == "sf_outbox"}
    return ops[:cut] + [o for o in ops[cut:] if o.table == "sf_outbox_delivery" and o.values["message_id"] in queued]


def _bundle(kind: str, run: Any, ops: list[Op]) -> Bundle:
    params = json.loads(run.params_json)
    ids = {str(o.values["id"]) for o in ops if o.table is not None and "id" in o.values}
    ids |= {run.flow_run_id} | {str(o.values["task_run_id"]) for o in ops if o.values.get("task_run_id")}
    literals = sorted({v for k, v in params.items() if k in ("coi", "lot", "tank_id")}, key=len, reverse=True)
    tokens = sorted(ids) + literals
    pattern = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")") if tokens else None
    compiled = []
    for o in ops:
        values = {k: _compile(v, pattern) for k, v in o.values.items()}
        compiled.append(Op(o.table, values, _compile(o.actor, pattern), o.action, _compile(o.reason, pattern)))
    b = Bundle(kind, compiled, tokens, run.started_at)
    for o in compiled:
        if o.table == "sf_step_record" and o.values.get("signature_id") and o.values["status"] == "signed":
            b.sig_data[o.values["signature_id"]] = o.values["data_json"]
    return b


def fresh_tokens(b: Bundle, k: int) -> dict[str, str]:
    out = {t: str(uuid4()) for t in b.tokens if UUID.fullmatch(t)}
    for t in b.tokens:
        if t.startswith("COI-"):
            out[t] = f"COI-BH-{k:08d}"
        elif t.startswith("LOT-"):
            out[t] = f"LOT-BH{k:07d}"
        elif t.startswith("LN2-"):
            out[t] = f"LN2-{1 + k % 4:02d}"
    return out


def replay(b: Bundle, k: int, start: datetime) -> list[Any]:
    """One copy of ``b`` starting at ``start``, as ``ledger.Entry`` writes, in the template's order."""
    from flows.record import ledger
    from flows.record.tables import RECORD_TABLES, Signature, SopRun

    fresh = fresh_tokens(b, k)
    shift = start - b.started_at
    run: Any = None
    out = []
    for o in b.ops:
        actor, reason = _render(o.actor, fresh, shift), _render(o.reason, fresh, shift)
        if o.table is None:
            v = o.values
            payload = json.loads(_render(v["payload"], fresh, shift))
            object_id = _render(v["object_id"], fresh, shift)
            out.append(ledger.Entry(actor, o.action, None, reason, v["object_type"], object_id, payload))
            continue
        row = RECORD_TABLES[o.table](**{c: _render(v, fresh, shift) for c, v in o.values.items()})
        if isinstance(row, SopRun):
            run = row
        elif isinstance(row, Signature):
            data = json.loads(_render(b.sig_data[o.values["id"]], fresh, shift))
            row.signed_sha256 = ledger.sha256_hex(ledger.canonical(ledger.signed_content(run, row.step_id, data, row)))
        out.append(ledger.Entry(actor, o.action, row, reason))
    return out


def write_base(url: str, base: list[Op], docs: list[tuple[bytes]]) -> None:
    """The template's staff, roles, training and SOP versions (ids kept), and its documents' bytes."""
    from flows.record import ledger
    from flows.record.db import init_db, write_session
    from flows.record.documents import store_document_bytes
    from flows.record.tables import RECORD_TABLES

    init_db(url)
    entries = []
    for o in base:
        if o.table is None:
            v = o.values
            payload = json.loads(v["payload"])
            entries.append(ledger.Entry(o.actor, o.action, None, o.reason, v["object_type"], v["object_id"], payload))
        else:
            entries.append(ledger.Entry(o.actor, o.action, RECORD_TABLES[o.table](**o.values), o.reason))
    with write_session(url) as s:
        ledger.append_many(s, entries)
        for (content,) in docs:
            store_document_bytes(s, content)


def write_runs(
    url: str,
    bundles: dict[str, Bundle],
    kinds: list[str],
    starts: list[datetime],
    first_k: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Replay ``kinds[i]`` at ``starts[i]``, ``CHUNK`` runs a transaction; returns the events written."""
    from flows.record import ledger
    from flows.record.db import write_session

    events = 0
    for lo in range(0, len(kinds), CHUNK):
        entries = []
        for i in range(lo, min(lo + CHUNK, len(kinds))):
            entries += replay(bundles[kinds[i]], first_k + i, starts[i])
        with write_session(url) as s:
            events += ledger.append_many(s, entries)
        if progress is not None:
            progress(min(lo + CHUNK, len(kinds)))
    return events


def finished_plan(n: int, now: datetime) -> tuple[list[str], list[datetime]]:
    """The kinds and start times of N finished runs, oldest first, the newest a day ago."""
    kinds = [MIX[i % len(MIX)] for i in range(n)]
    starts = [now - timedelta(days=1) - SPACING * (n - i) for i in range(n)]
    return kinds, starts


def open_plan(n: int, now: datetime) -> tuple[list[str], list[datetime]]:
    """N open runs, half waiting at each of ``OPEN_STEPS``, started within the last ``n`` minutes."""
    kinds = [f"open:{OPEN_STEPS[i % len(OPEN_STEPS)]}" for i in range(n)]
    starts = [now - timedelta(minutes=n - i) for i in range(n)]
    return kinds, starts
