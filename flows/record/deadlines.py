"""Stage 3: where a run's deadlines (``deadlines:``) and repeated steps (``repeat:``) stand, read from the record.

A deadline runs from one recorded time to another: ``<step>.<datetime field>`` is the value a
signer entered, ``<step>`` alone the time that step was signed. Its state:

    pending          ``from`` is not recorded yet
    running          ``from`` is recorded, ``to`` is not, and it is not yet due
    overdue          ``from`` is recorded, ``to`` is not, and it is past due (a deviation opens)
    met              both recorded, within the limit
    breached         both recorded, over the limit (a deviation opens)
    not_applicable   an end's step was skipped (``when:``), or the run ended without it
    invalid          the limit (``within_min``) cannot be evaluated for this run (``problem`` says why)

The deviation a deadline opens is a ``Deviation`` row whose ``step_id`` is the deadline's id
(deadline ids never equal step ids). Nothing here writes; ``flows.engine.deadlines`` opens them.
Must not import prefect.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from flows.record.state import FINAL_STATUSES, run_status, step_data, step_states
from flows.record.tables import Deviation, Signature, SopRun, StepRecord, iso_utc, utcnow
from flows.sop.expressions import ExpressionError, evaluate_value
from flows.sop.model import DeadlineSpec, RecordStepSpec, SopDefinition

__all__ = ["count_down", "deadline_states", "limit_of", "repetitions", "signed_at"]


def limit_of(spec: DeadlineSpec, run: SopRun | dict[str, Any]) -> timedelta:
    """The deadline's limit for this run (or for ``{"params", "product", "run"}`` before it exists).

    Raises:
        ExpressionError: ``within_min`` cannot be evaluated or is not a number of minutes.
    """
    if spec.within is not None:
        return spec.within
    context = (
        run
        if isinstance(run, dict)
        else {
            "params": json.loads(run.params_json),
            "product": json.loads(run.product_json) if run.product_json else None,
            "run": {"id": run.id, "sop_id": run.sop_id, "institution": run.institution},
        }
    )
    minutes = evaluate_value(spec.within_min or "", context, "within_min")
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes < 0:
        raise ExpressionError(f"within_min {spec.within_min!r} gives {minutes!r}, not a number of minutes")
    return timedelta(minutes=minutes)


def _end(session: Session, ref: str, states: dict[str, StepRecord]) -> tuple[str, datetime | None]:
    """(``recorded`` | ``skipped`` | ``open``, the time when recorded)."""
    step_id, _, field = ref.partition(".")
    rec = states.get(step_id)
    if rec is None or rec.status not in ("done", "skipped"):
        return "open", None
    if rec.status == "skipped":
        return "skipped", None
    if field:
        value = step_data(rec).get(field)
        return ("recorded", datetime.fromisoformat(value)) if isinstance(value, str) else ("skipped", None)
    return "recorded", signed_at(session, rec.run_id, step_id) or rec.at


def signed_at(session: Session, run_id: str, step_id: str) -> datetime | None:
    """When the step's entry was signed: its first accepted (``done``) record's signature, so a
    later correction does not move the time."""
    first = session.exec(
        select(StepRecord)
        .where(
            StepRecord.run_id == run_id,
            StepRecord.step_id == step_id,
            StepRecord.status == "done",
            col(StepRecord.supersedes_id).is_(None),
        )
        .order_by(col(StepRecord.n))
        .limit(1)
    ).first()
    if first is None:
        return None
    sig = session.get(Signature, first.signature_id) if first.signature_id else None
    return sig.signed_at if sig is not None else first.at


def deadline_states(
    session: Session, run: SopRun, sop: SopDefinition, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Every deadline of the run with its state, times and (while it runs) the seconds left."""
    if not sop.deadlines:
        return []
    now = now or utcnow()
    states = step_states(session, run.id)
    status = run_status(session, run.id)
    ended = status is not None and status.status in FINAL_STATUSES
    opened = {
        d.step_id: d.id
        for d in session.exec(select(Deviation).where(Deviation.run_id == run.id).order_by(col(Deviation.opened_at)))
    }
    out = []
    for spec in sop.deadlines:
        entry: dict[str, Any] = {
            "id": spec.id,
            "title": spec.title or spec.id,
            "from": spec.from_,
            "to": spec.to,
            "from_at": None,
            "to_at": None,
            "limit_seconds": None,
            "due_at": None,
            "seconds_left": None,
            "elapsed_seconds": None,
            "state": "pending",
            "deviation_id": opened.get(spec.id),
            "problem": None,
        }
        out.append(entry)
        (from_state, start), (to_state, end) = _end(session, spec.from_, states), _end(session, spec.to, states)
        entry["from_at"], entry["to_at"] = iso_utc(start), iso_utc(end)
        if "skipped" in (from_state, to_state):
            entry["state"] = "not_applicable"
            continue
        try:
            limit = limit_of(spec, run)
        except ExpressionError as exc:
            entry["state"], entry["problem"] = "invalid", str(exc)
            continue
        entry["limit_seconds"] = limit.total_seconds()
        if start is None:
            entry["state"] = "not_applicable" if ended else "pending"
            continue
        due = start + limit
        entry["due_at"] = iso_utc(due)
        if end is not None:
            entry["elapsed_seconds"] = (end - start).total_seconds()
            entry["state"] = "met" if end - start <= limit else "breached"
        elif ended:
            entry["state"] = "not_applicable"
        else:
            count_down(entry, now)
    return out


def count_down(entry: dict[str, Any], now: datetime) -> None:
    """A deadline of ``deadline_states`` still counting (``running`` or ``overdue``) as it stands at
    ``now``: its seconds left and whether it is past due (a kept entry read again later)."""
    due = datetime.fromisoformat(entry["due_at"])
    entry["seconds_left"] = round((due - now).total_seconds(), 3)
    entry["state"] = "running" if now <= due else "overdue"


def repetitions(
    session: Session, run_id: str, step: RecordStepSpec, states: dict[str, StepRecord] | None = None
) -> dict[str, Any]:
    """Where a repeated step (``repeat:``) stands: how many repetitions are done, and which one
    is next with its due time (the previous one's signing time + ``every``; none for the first)."""
    repeat = step.repeat
    if repeat is None:
        raise ValueError(f"step {step.id!r} is not repeated")
    states = states if states is not None else step_states(session, run_id)
    done = sorted(
        int(k.partition("#")[2]) for k, r in states.items() if k.startswith(f"{step.id}#") and r.status == "done"
    )
    summary = states.get(step.id)
    finished = summary is not None and summary.status in ("done", "skipped")
    nxt = None if finished or len(done) >= repeat.times else len(done) + 1
    due = None
    if nxt is not None and nxt > 1:
        prev = signed_at(session, run_id, f"{step.id}#{nxt - 1}")
        due = prev + repeat.every if prev is not None else None
    return {
        "every_seconds": repeat.every.total_seconds(),
        "times": repeat.times,
        "until": repeat.until,
        "done": len(done),
        "next": f"{step.id}#{nxt}" if nxt else None,
        "next_due_at": iso_utc(due),
        "ended_by": step_data(summary).get("ended_by") if finished and summary else None,
    }
