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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func
from sqlmodel import Session, SQLModel, col, select

from flows.record.disposition import disposition, run_coi, sop_of_run
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


def _product(sop: SopDefinition | None, run: SopRun) -> str | None:
    params = json.loads(run.params_json)
    name = sop.product_param() if sop is not None else None
    if name is not None and params.get(name) not in (None, ""):
        return str(params[name])
    product = json.loads(run.product_json) if run.product_json else None
    return str(product["id"]) if isinstance(product, dict) and product.get("id") else None


def _run_row(session: Session, run: SopRun, event: RunEvent | None = None) -> CurrentRun:
    sop = sop_of_run(session, run)
    return CurrentRun(
        run_id=run.id,
        institution=run.institution,
        sop_id=run.sop_id,
        sop_version=run.sop_version,
        product=_product(sop, run),
        coi=run_coi(run, sop),
        status=event.status if event else None,
        detail=event.detail if event else None,
        status_n=event.n if event else 0,
        open=event is None or event.status not in FINAL_STATUSES,
        started_at=run.started_at,
    )


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


@dataclass
class CurrentRows:
    """Current-state rows by key: runs by run id, steps by (run id, step id), quarantines by deviation id."""

    runs: dict[str, CurrentRun] = field(default_factory=dict)
    steps: dict[tuple[str, str], CurrentStep] = field(default_factory=dict)
    quarantines: dict[str, CurrentQuarantine] = field(default_factory=dict)


def _run_chunks(session: Session) -> Iterator[list[SopRun]]:
    last: datetime | None = None
    last_id = ""
    while True:
        query = select(SopRun).order_by(col(SopRun.started_at), col(SopRun.id)).limit(_CHUNK)
        if last is not None:
            query = query.where(
                (col(SopRun.started_at) > last) | ((col(SopRun.started_at) == last) & (col(SopRun.id) > last_id))
            )
        chunk = list(session.exec(query))
        if not chunk:
            return
        yield chunk
        last, last_id = chunk[-1].started_at, chunk[-1].id


def expected_rows(session: Session, runs: Iterable[SopRun]) -> CurrentRows:
    """The current state of ``runs`` as the record rows alone say it (runs and steps; see :func:`expected_quarantines`)."""
    out = CurrentRows()
    by_id = {r.id: r for r in runs}
    if not by_id:
        return out
    ids = list(by_id)
    newest: dict[str, RunEvent] = {}
    for ev in session.exec(select(RunEvent).where(col(RunEvent.run_id).in_(ids)).order_by(col(RunEvent.n))):
        newest[ev.run_id] = ev
    for run_id, run in by_id.items():
        out.runs[run_id] = _run_row(session, run, newest.get(run_id))
    records = session.exec(
        select(StepRecord).where(col(StepRecord.run_id).in_(ids)).order_by(col(StepRecord.run_id), col(StepRecord.n))
    )
    for rec in records:
        rec_id, run_id, step_id, n, status, at = rec.id, rec.run_id, rec.step_id, rec.n, rec.status, rec.at
        key = (run_id, step_id)
        cur = out.steps.get(key)
        if cur is None:
            cur = out.steps[key] = CurrentStep(
                run_id=run_id, step_id=step_id, record_id=rec_id, n=n, first_n=n, status=status, at=at
            )
        cur.record_id, cur.n, cur.status, cur.at = rec_id, n, status, at
        if status == "waiting" and cur.first_waiting_id is None:
            cur.first_waiting_id, cur.first_waiting_at = rec_id, at
    return out


def expected_quarantines(session: Session) -> dict[str, CurrentQuarantine]:
    """Every quarantine in force, as the deviations and their events say."""
    out = {}
    for dev in session.exec(select(Deviation).where(col(Deviation.quarantine).is_(True))):
        row = _quarantined(session, dev)
        if row is not None:
            out[dev.id] = row
    return out


def _fields(row: SQLModel) -> dict[str, Any]:
    return {name: getattr(row, name) for name in type(row).model_fields}


def _differences(table: str, key: str, live: SQLModel | None, want: SQLModel | None) -> list[str]:
    if live is None:
        return [f"{table} row {key}: missing: the record says it should be there ({_brief(want)})"]
    if want is None:
        return [f"{table} row {key}: the record has nothing it stands for: added or left behind outside sopflow"]
    have, should = _fields(live), _fields(want)
    changed = [f"{k} is {have[k]!r}, the record says {should[k]!r}" for k in should if have.get(k) != should[k]]
    return [f"{table} row {key}: disagrees with the record: {'; '.join(changed)}"] if changed else []


def _brief(row: SQLModel | None) -> str:
    if row is None:
        return ""
    values = _fields(row)
    shown = {k: values[k] for k in ("status", "coi") if k in values}
    return ", ".join(f"{k} {v!r}" for k, v in shown.items())


def compare(session: Session, *, limit_problems: int = 20) -> list[str]:
    """Every current-state row that disagrees with the record rows (empty when they agree)."""
    problems: list[str] = []
    seen_runs = seen_steps = 0
    for chunk in _run_chunks(session):
        want = expected_rows(session, chunk)
        ids = [r.id for r in chunk]
        live_runs = {r.run_id: r for r in session.exec(select(CurrentRun).where(col(CurrentRun.run_id).in_(ids)))}
        live_steps = {
            (r.run_id, r.step_id): r for r in session.exec(select(CurrentStep).where(col(CurrentStep.run_id).in_(ids)))
        }
        seen_runs += len(live_runs)
        seen_steps += len(live_steps)
        for run_id in ids:
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
        problems += _differences("sf_current_quarantine", dev_id, live_q.get(dev_id), want_q.get(dev_id))
    return problems[:limit_problems]


def rebuild(session: Session) -> int:
    """Write the current-state tables afresh from the record rows (inside a write session);
    returns how many runs they now hold."""
    for table in reversed(CURRENT_TABLES):
        session.exec(delete(table))
    n = 0
    for chunk in _run_chunks(session):
        want = expected_rows(session, chunk)
        session.add_all([*want.runs.values(), *want.steps.values()])
        session.flush()
        n += len(want.runs)
    session.add_all(expected_quarantines(session).values())
    session.flush()
    return n
