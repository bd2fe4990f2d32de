"""Stage 3: the current state of the record, kept for reads that cost what is open, not what is past.

Three tables (``flows.record.tables``), written by :func:`apply` inside the transaction of every
``ledger.append``, so they move with the record and never without it:

    sf_current_run         every run: its status now (newest ``RunEvent``), open or not, and what the
                           runs list filters on (institution, SOP, product, COI, start time)
    sf_current_step        every step of every run: its newest ``StepRecord`` (status, since when),
                           the position it first appeared at, and its first ``waiting`` record
    sf_current_quarantine  every deviation with ``quarantine: true`` and no disposition yet, by COI

The inbox, the runs list, every sweep of the executor and the quarantine check read these through
indexes: a waiting step is one index lookup whatever the history holds. The ledger stays the source
of truth: :func:`expected_rows` works the same state out from the record rows alone, :func:`compare`
names every current-state row that disagrees with them (``sopflow audit verify`` runs it after the
chain check), and :func:`rebuild` writes them afresh from the record (a database made before these
tables existed gets them on its first ``init_db``).

These tables are not records: rows here are updated and deleted as the record moves on (the record
tables themselves stay append-only). Positions (``n``) only grow within a run (``next_position``),
so the newest record is the one with the highest ``n``. Must not import prefect.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert
from sqlalchemy import select as sa_select
from sqlmodel import Session, SQLModel, col, select

from flows.record.disposition import coi_in, disposition, run_coi, sop_of_run
from flows.record.tables import (
    CURRENT_TABLES,
    CurrentQuarantine,
    CurrentRun,
    CurrentStep,
    Deviation,
    DeviationEvent,
    RunEvent,
    SopRun,
    StepRecord,
)

if TYPE_CHECKING:  # only annotations here: importing flows.sop is left to what parses an SOP
    from flows.sop.model import SopDefinition

__all__ = ["FINAL_STATUSES", "CurrentRows", "apply", "compare", "expected_rows", "rebuild"]

FINAL_STATUSES = ("completed", "rejected", "stopped", "failed")
"""Run statuses after which nothing more happens in the run (``flows.record.state`` re-exports it)."""

_CHUNK = 1000
"""Runs compared (or rebuilt) per round: memory stays flat in history."""


# -- written with every ledger append -------------------------------------------------------------


def apply(session: Session, row: SQLModel) -> None:
    """Bring the current state up to date with one record row just appended (same transaction)."""
    if isinstance(row, SopRun):
        session.add(_run_row(session, row))
    elif isinstance(row, RunEvent):
        _run_event(session, row)
    elif isinstance(row, StepRecord):
        _step_record(session, row)
    elif isinstance(row, Deviation):
        if row.quarantine:
            _quarantine(session, row)
    elif isinstance(row, DeviationEvent):
        dev = session.get(Deviation, row.deviation_id)
        if dev is not None and dev.quarantine:
            _quarantine(session, dev)


def _run_values(sop: SopDefinition | None, run: Any, status: tuple[int, str | None, str | None]) -> dict[str, Any]:
    """A ``CurrentRun``'s columns: ``run`` is a ``SopRun`` or a row of its columns, ``status`` the
    ``(n, status, detail)`` of its newest ``RunEvent`` (``(0, None, None)`` before the first)."""
    params = json.loads(run.params_json)
    name = sop.product_param() if sop is not None else None
    started_with = json.loads(run.product_json) if run.product_json else None  # the catalogue entry
    product: str | None = None
    if name is not None and params.get(name) not in (None, ""):
        product = str(params[name])
    elif isinstance(started_with, dict) and started_with.get("id"):
        product = str(started_with["id"])
    n, state, detail = status
    return {
        "run_id": run.id,
        "institution": run.institution,
        "sop_id": run.sop_id,
        "sop_version": run.sop_version,
        "product": product,
        "coi": coi_in(params, sop),
        "status": state,
        "detail": detail,
        "status_n": n,
        "open": state not in FINAL_STATUSES,
        "started_at": run.started_at,
    }


def _run_row(session: Session, run: SopRun, event: RunEvent | None = None) -> CurrentRun:
    status = (event.n, event.status, event.detail) if event else (0, None, None)
    return CurrentRun(**_run_values(sop_of_run(session, run), run, status))


def _run_event(session: Session, ev: RunEvent) -> None:
    cur = session.get(CurrentRun, ev.run_id)
    if cur is None:  # a run from before these tables: start its row from the record
        run = session.get(SopRun, ev.run_id)
        if run is None:
            return
        cur = _run_row(session, run)
        session.add(cur)
    if ev.n >= cur.status_n:
        cur.status, cur.detail, cur.status_n = ev.status, ev.detail, ev.n
        cur.open = ev.status not in FINAL_STATUSES


def _step_record(session: Session, rec: StepRecord) -> None:
    cur = session.get(CurrentStep, {"run_id": rec.run_id, "step_id": rec.step_id})
    if cur is None:
        session.add(
            CurrentStep(
                run_id=rec.run_id,
                step_id=rec.step_id,
                record_id=rec.id,
                n=rec.n,
                first_n=rec.n,
                status=rec.status,
                at=rec.at,
                first_waiting_id=rec.id if rec.status == "waiting" else None,
                first_waiting_at=rec.at if rec.status == "waiting" else None,
            )
        )
        return
    if rec.n > cur.n:
        cur.record_id, cur.n, cur.status, cur.at = rec.id, rec.n, rec.status, rec.at
    cur.first_n = min(cur.first_n, rec.n)
    if rec.status == "waiting" and cur.first_waiting_id is None:
        cur.first_waiting_id, cur.first_waiting_at = rec.id, rec.at


def _quarantined(session: Session, dev: Deviation) -> CurrentQuarantine | None:
    """The row ``dev`` should have: quarantine and no disposition yet; else None."""
    if not dev.quarantine or disposition(session, dev.id) is not None:
        return None
    run = session.get(SopRun, dev.run_id)
    coi = run_coi(run, sop_of_run(session, run)) if run is not None else None
    return CurrentQuarantine(deviation_id=dev.id, coi=coi, run_id=dev.run_id, opened_at=dev.opened_at)


def _quarantine(session: Session, dev: Deviation) -> None:
    want = _quarantined(session, dev)
    have = session.get(CurrentQuarantine, dev.id)
    if want is not None and have is None:
        session.add(want)
    elif want is None and have is not None:
        session.delete(have)


# -- worked out from the record, compared, rebuilt ------------------------------------------------

_RUN, _RUN_EVENT, _STEP_RECORD = SopRun.__table__, RunEvent.__table__, StepRecord.__table__  # type: ignore[attr-defined]
_CURRENT_RUN, _CURRENT_STEP = CurrentRun.__table__, CurrentStep.__table__  # type: ignore[attr-defined]


@dataclass
class CurrentRows:
    """The current state of the runs whose ids lie between ``lo`` and ``hi`` (by the database's own
    order), as plain column values: runs by run id, steps by (run id, step id)."""

    lo: str
    hi: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def expected_rows(session: Session) -> Iterator[CurrentRows]:
    """The current state of every run as the record rows alone say it, ``_CHUNK`` runs at a time in
    id order: plain columns read by id range (no row objects), so memory stays flat and the cost is a
    few index range scans per chunk (see :func:`expected_quarantines` for quarantines)."""
    sops: dict[tuple[str, str], SopDefinition | None] = {}
    last: str | None = None
    while True:
        query = sa_select(
            _RUN.c.id,
            _RUN.c.institution,
            _RUN.c.sop_id,
            _RUN.c.sop_version,
            _RUN.c.sop_version_id,
            _RUN.c.sop_sha256,
            _RUN.c.params_json,
            _RUN.c.product_json,
            _RUN.c.started_at,
        ).order_by(_RUN.c.id)
        if last is not None:
            query = query.where(_RUN.c.id > last)
        runs = session.execute(query.limit(_CHUNK)).all()
        if not runs:
            return
        out = CurrentRows(lo=runs[0].id, hi=runs[-1].id)
        newest: dict[str, tuple[int, str, str | None]] = {}
        events = sa_select(_RUN_EVENT.c.run_id, _RUN_EVENT.c.n, _RUN_EVENT.c.status, _RUN_EVENT.c.detail)
        for run_id, n, status, detail in session.execute(
            events.where(_RUN_EVENT.c.run_id.between(out.lo, out.hi)).order_by(_RUN_EVENT.c.n)
        ):
            newest[run_id] = (n, status, detail)
        for r in runs:
            key = (r.sop_version_id, r.sop_sha256)
            if key not in sops:  # one parse per SOP revision, not per run
                sops[key] = sop_of_run(session, session.get_one(SopRun, r.id))
            out.runs[r.id] = _run_values(sops[key], r, newest.get(r.id, (0, None, None)))
        records = sa_select(
            _STEP_RECORD.c.id,
            _STEP_RECORD.c.run_id,
            _STEP_RECORD.c.step_id,
            _STEP_RECORD.c.n,
            _STEP_RECORD.c.status,
            _STEP_RECORD.c.at,
        ).where(_STEP_RECORD.c.run_id.between(out.lo, out.hi))
        for rec_id, run_id, step_id, n, status, at in session.execute(
            records.order_by(_STEP_RECORD.c.run_id, _STEP_RECORD.c.n)
        ):
            cur = out.steps.get((run_id, step_id))
            if cur is None:
                cur = out.steps[(run_id, step_id)] = {
                    "run_id": run_id,
                    "step_id": step_id,
                    "first_n": n,
                    "first_waiting_id": None,
                    "first_waiting_at": None,
                }
            cur.update(record_id=rec_id, n=n, status=status, at=at)
            if status == "waiting" and cur["first_waiting_id"] is None:
                cur["first_waiting_id"], cur["first_waiting_at"] = rec_id, at
        yield out
        last = out.hi


def expected_quarantines(session: Session) -> dict[str, CurrentQuarantine]:
    """Every quarantine in force, as the deviations and their events say."""
    out = {}
    for dev in session.exec(select(Deviation).where(col(Deviation.quarantine).is_(True))):
        row = _quarantined(session, dev)
        if row is not None:
            out[dev.id] = row
    return out


def _fields(row: SQLModel | None) -> dict[str, Any] | None:
    return {name: getattr(row, name) for name in type(row).model_fields} if row is not None else None


def _differences(table: str, key: str, live: dict[str, Any] | None, want: dict[str, Any] | None) -> list[str]:
    if live is None:
        return [f"{table} row {key}: missing: the record says it should be there ({_brief(want)})"]
    if want is None:
        return [f"{table} row {key}: the record has nothing it stands for: added or left behind outside sopflow"]
    changed = [f"{k} is {live.get(k)!r}, the record says {v!r}" for k, v in want.items() if live.get(k) != v]
    return [f"{table} row {key}: disagrees with the record: {'; '.join(changed)}"] if changed else []


def _brief(values: dict[str, Any] | None) -> str:
    shown = {k: values[k] for k in ("status", "coi") if k in values} if values else {}
    return ", ".join(f"{k} {v!r}" for k, v in shown.items())


def compare(session: Session, *, limit_problems: int = 20) -> list[str]:
    """Every current-state row that disagrees with the record rows (empty when they agree)."""
    problems: list[str] = []
    seen_runs = seen_steps = 0
    for want in expected_rows(session):
        live_runs = {
            r.run_id: r._asdict()
            for r in session.execute(sa_select(_CURRENT_RUN).where(_CURRENT_RUN.c.run_id.between(want.lo, want.hi)))
        }
        live_steps = {
            (r.run_id, r.step_id): r._asdict()
            for r in session.execute(sa_select(_CURRENT_STEP).where(_CURRENT_STEP.c.run_id.between(want.lo, want.hi)))
        }
        seen_runs += len(live_runs)
        seen_steps += len(live_steps)
        for run_id in sorted(set(want.runs) | set(live_runs)):
            problems += _differences("sf_current_run", run_id, live_runs.get(run_id), want.runs.get(run_id))
        for key in sorted(set(want.steps) | set(live_steps)):
            problems += _differences("sf_current_step", "/".join(key), live_steps.get(key), want.steps.get(key))
        if len(problems) >= limit_problems:
            return problems[:limit_problems]
    # Rows whose run the record does not have (only possible behind sopflow's back).
    total_runs = session.exec(select(func.count()).select_from(CurrentRun)).one()
    total_steps = session.exec(select(func.count()).select_from(CurrentStep)).one()
    if total_runs != seen_runs:
        problems.append(f"sf_current_run: {total_runs - seen_runs} row(s) name no run of the record")
    if total_steps != seen_steps:
        problems.append(f"sf_current_step: {total_steps - seen_steps} row(s) name no run of the record")
    want_q = expected_quarantines(session)
    live_q = {q.deviation_id: q for q in session.exec(select(CurrentQuarantine))}
    for dev_id in sorted(set(want_q) | set(live_q)):
        problems += _differences(
            "sf_current_quarantine", dev_id, _fields(live_q.get(dev_id)), _fields(want_q.get(dev_id))
        )
    return problems[:limit_problems]


def rebuild(session: Session) -> int:
    """Write the current-state tables afresh from the record rows (inside a write session);
    returns how many runs they now hold."""
    for table in reversed(CURRENT_TABLES):
        session.exec(delete(table))
    n = 0
    for want in expected_rows(session):
        session.execute(insert(_CURRENT_RUN), list(want.runs.values()))
        if want.steps:
            session.execute(insert(_CURRENT_STEP), list(want.steps.values()))
        n += len(want.runs)
    session.add_all(expected_quarantines(session).values())
    session.flush()
    return n
