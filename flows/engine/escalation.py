"""Stage 2: time-outs of human steps: tell the ``escalate_to`` role, or open a deviation too.

A human step may declare ``timeout`` and ``escalate_to`` (and ``on_timeout: escalate | deviation``).
Its waiting period starts at its first ``waiting`` record (a refused resume writes a new one, but
does not restart the clock) and ends when it is signed. The executor's periodic sweep calls
:func:`escalate_overdue`: every step still waiting after its time-out, not yet escalated in this
waiting period, gets one apprise message to the ``escalate_to`` role with the run, the step and
how long it has waited, and one ``Escalation`` row (kind ``escalate`` or ``deviation``; with
``deviation`` a ``Deviation`` is opened in the same transaction). The step keeps waiting.

Exactly once: the worker runs this sweep under the job lease ``job:escalate``
(``flows.engine.leases``), so one worker at a time sweeps; the message is recorded in the outbox
under ``escalation:<waiting id>`` before it is delivered (``flows.engine.outbox``), and the row's
``waiting_id`` (the period's first waiting record) is unique, written under the record's write lock
after checking for it. A sweep that dies between the message and the row re-runs, finds the
message recorded (and delivered, or not), and records the row: one message, one row.

No Prefect here: the sweep reads and writes sopflow's record and delivers through apprise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.gates import find_human_step
from flows.engine.leases import job_key
from flows.engine.operators import emit
from flows.engine.outbox import notify_once
from flows.engine.steps import SYSTEM
from flows.errors import RecordError
from flows.outputs.messages import Message, message
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.dose import run_facts
from flows.record.pinned import pinned_sop
from flows.record.state import FINAL_STATUSES
from flows.record.tables import CurrentRun, CurrentStep, Deviation, Escalation, SopRun, utcnow
from flows.sop.model import HumanStepSpec, SopDefinition, text_in

__all__ = ["Overdue", "escalate_overdue", "format_duration", "overdue_steps", "timed_waits"]

log = logging.getLogger("sopflow.escalation")


@dataclass(frozen=True)
class Overdue:
    """A human step waiting longer than its time-out."""

    run: SopRun
    sop: SopDefinition
    step: HumanStepSpec
    waiting_id: str
    """The id of the waiting period's first ``waiting`` record."""
    since: datetime
    due: datetime
    escalated_at: datetime | None


def format_duration(delta: timedelta) -> str:
    """'3d 4h', '4h 12m', '25m', '40s'."""
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def timed_waits(session: Session) -> list[Overdue]:
    """Every human step with a time-out waiting now in a run still going, with when it falls due
    (``escalated_at`` not read: None). What does not depend on the clock; ``overdue_steps`` keeps
    those past due."""
    # The steps waiting now, from the current-state index (flows.record.current): what is open, not
    # every record ever written; each carries its waiting period's first record. Plain columns: the
    # runs themselves are read only for the steps that have a time-out.
    waiting = session.execute(
        sa_select(
            col(CurrentStep.run_id),
            col(CurrentStep.step_id),
            col(CurrentStep.first_waiting_id),
            col(CurrentStep.first_waiting_at),
            col(SopRun.sop_version_id),
            col(SopRun.sop_sha256),
            col(CurrentRun.status),
        )
        .join(SopRun, col(SopRun.id) == col(CurrentStep.run_id))
        .join(CurrentRun, col(CurrentRun.run_id) == col(CurrentStep.run_id))
        .where(col(CurrentStep.status) == "waiting")
        .order_by(col(CurrentStep.at))
    ).all()
    sops: dict[tuple[str, str], SopDefinition] = {}
    timed: list[tuple[str, HumanStepSpec, str, datetime, datetime, SopDefinition]] = []
    for run_id, step_id, first_id, first_at, version_id, sha, status in waiting:
        if status is not None and status in FINAL_STATUSES:
            continue
        if (version_id, sha) not in sops:
            sops[(version_id, sha)] = pinned_sop(session, version_id, sha, run_id=run_id)
        sop = sops[(version_id, sha)]
        step = find_human_step(sop, step_id)
        if step is None or step.timeout is None or first_id is None or first_at is None:
            continue
        timed.append((run_id, step, first_id, first_at, first_at + step.timeout, sop))
    runs = (
        {r.id: r for r in session.exec(select(SopRun).where(col(SopRun.id).in_({t[0] for t in timed})))}
        if timed
        else {}
    )
    return [
        Overdue(runs[run_id], sop, step, first_id, since, due, None)
        for run_id, step, first_id, since, due, sop in timed
    ]


def overdue_steps(session: Session, now: datetime | None = None) -> list[Overdue]:
    """Every human step of a run still going whose newest record is ``waiting`` past its time-out."""
    now = now or utcnow()
    out: list[Overdue] = []
    for o in timed_waits(session):
        if o.due > now:
            continue
        esc = session.exec(select(Escalation).where(Escalation.waiting_id == o.waiting_id)).first()
        out.append(replace(o, escalated_at=esc.at if esc else None))
    return out


def _message(o: Overdue, now: datetime, settings: Settings) -> tuple[str, Message]:
    facts = run_facts(settings, o.run, o.sop)
    msg = message(
        "overdue",
        facts,
        step=text_in(o.step.title, facts.language) or o.step.id,
        step_id=o.step.id,
        role=o.step.role,
        due_at=o.due,
        waited=now - o.since,
        limit=o.step.timeout or timedelta(),
    )
    return msg.title, msg


def escalate_overdue(settings: Settings, *, now: datetime | None = None, lease: str = job_key("escalate")) -> int:
    """Escalate every overdue human step not yet escalated in its waiting period; returns how many.

    ``now`` is the clock (tests pass one; the executor passes none); ``lease`` the lease its
    messages are delivered under (the worker holds it while the job runs).

    Raises:
        ConfigError: the notification channels file is broken.
    """
    now = now or utcnow()
    with read_session(settings.database_url) as s:
        pending = [o for o in overdue_steps(s, now) if o.escalated_at is None]
        for o in pending:
            s.expunge(o.run)
    n = 0
    for o in pending:
        roles = [o.step.escalate_to] if o.step.escalate_to else []
        title, body = _message(o, now, settings)
        deliveries = (
            notify_once(
                settings,
                key=f"escalation:{o.waiting_id}",
                institution=o.run.institution,
                roles=roles,
                title=title,
                body=body,
                lease=lease,
                run_id=o.run.id,
            )
            if roles
            else []
        )
        try:
            with write_session(settings.database_url) as s:
                if s.exec(select(Escalation.id).where(Escalation.waiting_id == o.waiting_id)).first() is not None:
                    continue  # another executor recorded it first
                deviation_id = None
                if o.step.on_timeout == "deviation":
                    spec = o.step.timeout_deviation
                    dev = Deviation(
                        run_id=o.run.id,
                        step_id=o.step.id,
                        classification=spec.classification,
                        description=spec.description
                        or (
                            f"step {o.step.id!r} waited {format_duration(now - o.since)} for its signer, "
                            f"longer than its time-out of {format_duration(o.step.timeout or timedelta())}"
                        ),
                        quarantine=False,
                        opened_at=now,
                    )
                    ledger.append(s, dev, actor=SYSTEM, action="deviation.open")
                    deviation_id = dev.id
                esc = Escalation(
                    run_id=o.run.id,
                    step_id=o.step.id,
                    waiting_id=o.waiting_id,
                    kind=o.step.on_timeout,
                    to_role=o.step.escalate_to,
                    deliveries_json=json.dumps(deliveries, sort_keys=True),
                    deviation_id=deviation_id,
                    waiting_since=o.since,
                    at=now,
                )
                ledger.append(s, esc, actor=SYSTEM, action=f"escalation.{o.step.on_timeout}")
            escalated = {"step_id": o.step.id, "to_role": o.step.escalate_to, "kind": o.step.on_timeout}
            emit("sopflow.step.escalated", o.run, {**escalated, "deviation_id": deviation_id})
            if deviation_id is not None:
                emit("sopflow.deviation.opened", o.run, {"deviation_id": deviation_id, "step_id": o.step.id})
        except RecordError:  # the unique waiting_id: another executor won the race
            log.warning("escalation of run %s step %s was recorded elsewhere", o.run.id, o.step.id)
            continue
        n += 1
    return n
