"""Stage 3: a deviation's lifecycle, quarantine of a dose by its COI, and the open-deviation list.

A ``Deviation`` row is written once, when a check (or a time-out, or a deadline) opens it. What
happens to it afterwards is a sequence of ``DeviationEvent`` rows, appended when a human step
with ``updates_deviation: <kind>`` is accepted (the inline ``<check>__disposition`` step counts as
``disposition``), and ``subrun`` when its handling SOP is started. The state is read from them:

    open          no ``closed`` event
    dispositioned ``disposition`` events decide it (``disposition()``: every disposition step of the
                  handling SOP signed, or one rejecting; approve = use with documented risk
                  acceptance, anything else = reject)
    quarantined   ``quarantine: true`` and no disposition yet: the dose (the COI param of the run
                  that opened it) may not start a run, nor open a gate of another run
    CAPA          each ``capa`` event (``action``, ``owner``, ``due``) is an action; it is done once an
                  ``effectiveness`` or ``closed`` event follows it, overdue when not done after ``due``

Holding a run (issue 15): a run with an open ``major`` or ``critical`` deviation (``HOLDING_CLASSES``)
opened on it, by a check, a deadline, a time-out or a person, neither completes nor releases its
dose until the deviation's disposition is signed (``holding_deviations``). Without a handling run,
QA signs it at the run's hold step ``deviation_<12 hex of the id>__disposition`` (``hold_step_id``),
an inline disposition like a failed check's.

Must not import prefect.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from flows.errors import SopInputError
from flows.record import ledger
from flows.record.disposition import (
    coi_param,
    deviation_events,
    disposition,
    disposition_value,
    run_coi,
    sop_of_run,
)
from flows.record.tables import CurrentQuarantine, Deviation, DeviationEvent, SopRun, iso_utc, next_position, utcnow
from flows.sop.model import HOLD_ROLE, HOLDING_CLASSES

__all__ = [
    "HOLDING_CLASSES",
    "HOLD_ROLE",
    "active_quarantines",
    "append_deviation_event",
    "check_deviation_param",
    "coi_param",
    "deviation_events",
    "deviation_state",
    "disposition",
    "disposition_value",
    "handling_run_id",
    "hold_deviation",
    "hold_step_id",
    "holding_deviations",
    "list_deviations",
    "quarantine_problem",
    "run_coi",
]


def append_deviation_event(
    session: Session,
    deviation_id: str,
    kind: str,
    data: dict[str, Any],
    *,
    run_id: str,
    step_id: str,
    actor_id: str | None = None,
    signature_id: str | None = None,
) -> DeviationEvent:
    """Append one lifecycle event (inside the caller's write session)."""
    ev = DeviationEvent(
        deviation_id=deviation_id,
        n=next_position(session, DeviationEvent.n, DeviationEvent.deviation_id, deviation_id),
        kind=kind,
        data_json=ledger.canonical(data).decode(),
        run_id=run_id,
        step_id=step_id,
        actor_id=actor_id,
        signature_id=signature_id,
        at=utcnow(),
    )
    ledger.append(session, ev, actor=actor_id or "system", action=f"deviation.{kind}")
    return ev


def deviation_state(session: Session, dev: Deviation, now: datetime | None = None) -> dict[str, Any]:
    """A deviation with its events and what they add up to (see the module docstring)."""
    now = now or utcnow()
    events = deviation_events(session, dev.id)
    decided = disposition(session, dev.id, events)
    decision = decided["decision"] if decided else None
    closed = any(e.kind == "closed" for e in events)
    capas = []
    for i, e in enumerate(events):
        if e.kind != "capa":
            continue
        data = json.loads(e.data_json)
        done = any(later.kind in ("effectiveness", "closed") for later in events[i + 1 :])
        due = _parse(data.get("due"))
        capas.append(
            {
                "event_id": e.id,
                "action": data.get("action"),
                "owner": data.get("owner"),
                "due": data.get("due"),
                "done": done,
                "overdue": bool(due and not done and due < now),
                "run_id": e.run_id,
            }
        )
    run = session.get(SopRun, dev.run_id)
    subruns = [json.loads(e.data_json).get("run_id") for e in events if e.kind == "subrun"]
    return {
        "id": dev.id,
        "run_id": dev.run_id,
        "sop_id": run.sop_id if run else None,
        "sop_version": run.sop_version if run else None,
        "institution": run.institution if run else None,
        "product": json.loads(run.product_json).get("name") if run and run.product_json else None,
        "step_id": dev.step_id,
        "coi": run_coi(run, sop_of_run(session, run)) if run else None,
        "classification": dev.classification,
        "description": dev.description,
        "quarantine": dev.quarantine,
        "opened_at": iso_utc(dev.opened_at),
        "status": "closed" if closed else ("dispositioned" if decided else "open"),
        "decision": decision,
        "disposition": decided,
        "quarantined": bool(dev.quarantine and decided is None),
        "subruns": subruns,
        "capas": capas,
        "events": [
            {
                "n": e.n,
                "kind": e.kind,
                "at": iso_utc(e.at),
                "run_id": e.run_id,
                "step_id": e.step_id,
                "actor_id": e.actor_id,
                "signature_id": e.signature_id,
                "data": json.loads(e.data_json),
            }
            for e in events
        ],
    }


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def active_quarantines(session: Session, coi: str) -> list[Deviation]:
    """Deviations with ``quarantine: true`` and no disposition yet, opened on a run carrying ``coi``
    (the current-state index ``sf_current_quarantine``: one lookup by COI, whatever the history holds)."""
    return list(
        session.exec(
            select(Deviation)
            .join(CurrentQuarantine, col(CurrentQuarantine.deviation_id) == col(Deviation.id))
            .where(CurrentQuarantine.coi == coi)
            .order_by(col(Deviation.opened_at))
        )
    )


def _lineage(session: Session, run_id: str | None) -> set[str]:
    """The run and every ancestor through ``parent_run_id``."""
    seen: set[str] = set()
    while run_id and run_id not in seen:
        seen.add(run_id)
        run = session.get(SopRun, run_id)
        run_id = run.parent_run_id if run else None
    return seen


def quarantine_problem(
    session: Session, coi: str | None, *, run_id: str | None = None, deviation_id: str | None = None
) -> str | None:
    """Why a run on ``coi`` may not go on (start, open a gate), or None.

    The run that opened the deviation, its sub-runs and a run handling it (``deviation_id``) are
    not held: they are how the deviation gets its disposition.
    """
    if not coi:
        return None
    lineage = _lineage(session, run_id)
    for dev in active_quarantines(session, coi):
        if dev.id == deviation_id or dev.run_id in lineage:
            continue
        return (
            f"dose {coi} is quarantined by deviation {dev.id} ({dev.classification}: {dev.description}) "
            "until QA signs its disposition"
        )
    return None


def list_deviations(session: Session, now: datetime | None = None, *, include_closed: bool = False) -> dict[str, Any]:
    """``{"deviations": [open ones, oldest first], "overdue_capas": [...]}`` (``sopflow deviations``)."""
    now = now or utcnow()
    devs = [
        deviation_state(session, d, now) for d in session.exec(select(Deviation).order_by(col(Deviation.opened_at)))
    ]
    shown = [d for d in devs if include_closed or d["status"] != "closed"]
    overdue = [{**c, "deviation_id": d["id"], "coi": d["coi"]} for d in devs for c in d["capas"] if c["overdue"]]
    return {"now": now.isoformat(), "deviations": shown, "overdue_capas": overdue}


def check_deviation_param(session: Session, sop: Any, params: dict[str, Any]) -> None:
    """A run of an SOP with ``updates_deviation`` steps must name an existing deviation (SopInputError)."""
    if not any(getattr(st, "updates_deviation", None) for st in sop.steps):
        return
    dev_id = params.get("deviation_id")
    if not dev_id or session.get(Deviation, dev_id) is None:
        raise SopInputError(
            [
                f"{sop.id} params.deviation_id: {dev_id!r} is not a deviation id; "
                "`sopflow deviations` lists the open ones"
            ]
        )


# -- holding a run -----------------------------------------------------------------------------------
_HOLD_STEP = re.compile(r"^deviation_([0-9a-f]{12})__disposition$")


def hold_step_id(deviation_id: str) -> str:
    """The run's step at which QA signs the disposition of deviation ``deviation_id``."""
    return f"deviation_{deviation_id.replace('-', '')[:12]}__disposition"


def hold_deviation(session: Session, run_id: str, step_id: str) -> Deviation | None:
    """The deviation of run ``run_id`` whose hold step is ``step_id``, or None (not a hold step)."""
    if _HOLD_STEP.match(step_id) is None:
        return None
    for dev in session.exec(select(Deviation).where(Deviation.run_id == run_id)):
        if hold_step_id(dev.id) == step_id:
            return dev
    return None


def handling_run_id(session: Session, deviation_id: str) -> str | None:
    """The run of the deviation SOP started on it (its newest ``subrun`` event, else the newest run
    whose ``deviation_id`` param names it), if any."""
    runs = [
        json.loads(e.data_json).get("run_id") for e in deviation_events(session, deviation_id) if e.kind == "subrun"
    ]
    if runs and runs[-1]:
        return str(runs[-1])
    # A deviation raised by hand before its handling run was recorded as an event: a run naming it.
    named = select(SopRun).where(col(SopRun.params_json).contains(deviation_id))
    for run in session.exec(named.order_by(col(SopRun.started_at).desc())):
        if json.loads(run.params_json).get("deviation_id") == deviation_id:
            return run.id
    return None


def holding_deviations(session: Session, run_id: str) -> list[tuple[Deviation, dict[str, Any] | None]]:
    """The deviations opened on the run that hold it: major or critical, not closed, and either
    without a disposition (None) or with one that rejects the dose (the run may not complete)."""
    out: list[tuple[Deviation, dict[str, Any] | None]] = []
    query = select(Deviation).where(Deviation.run_id == run_id).order_by(col(Deviation.opened_at), col(Deviation.id))
    for dev in session.exec(query):
        if dev.classification not in HOLDING_CLASSES:
            continue
        events = deviation_events(session, dev.id)
        decided = disposition(session, dev.id, events)
        if decided is not None and decided["decision"] == "approve":
            continue
        if decided is None and any(e.kind == "closed" for e in events):
            continue
        out.append((dev, decided))
    return out
