"""Stage 2: breached deadlines open deviations; the run goes on (a major or critical one then holds
its completion until QA signs the disposition: ``run_sop._hold``).

The walk calls :func:`settle_deadlines` after every step (a ``to`` just recorded over its limit),
and the executor's sweep calls :func:`sweep_deadlines` every few seconds (a ``from`` recorded,
no ``to``, and now past due). Each opens one ``Deviation`` per deadline and run (its ``step_id``
is the deadline's id), audited as ``deviation.open``, and tells the deadline's
``deviation.notify`` roles. Exactly once: the row is written under the record's write lock after
looking for it, and its message is recorded in the outbox in the same transaction
(``deadline:<deviation id>``), then delivered (``flows.engine.outbox``): a crash after the row is
no lost message, the outbox's sweep delivers it. The sweep runs under the job lease ``job:deadlines``.

No Prefect here: reads and writes sopflow's record and delivers through apprise.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlmodel import col, select

from flows.config import Settings
from flows.engine.escalation import format_duration
from flows.engine.leases import job_key, run_key
from flows.engine.operators import emit
from flows.engine.outbox import deliver_message, queue
from flows.engine.steps import SYSTEM
from flows.outputs.messages import Message, message
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.deadlines import deadline_states
from flows.record.dose import run_facts
from flows.record.pinned import pinned_sop
from flows.record.tables import CurrentRun, Deviation, SopRun, utcnow
from flows.sop.model import SopDefinition, text_in

__all__ = ["settle_deadlines", "sweep_deadlines"]

log = logging.getLogger("sopflow.deadlines")


def _description(entry: dict[str, object], limit: timedelta) -> str:
    if entry["state"] == "breached":
        took = timedelta(seconds=float(entry["elapsed_seconds"] or 0))  # type: ignore[arg-type]
        return (
            f"deadline {entry['title']!r} breached: {format_duration(took)} from {entry['from']} to {entry['to']}, "
            f"more than its limit of {format_duration(limit)}"
        )
    return (
        f"deadline {entry['title']!r} overdue: {entry['to']} not recorded within {format_duration(limit)} "
        f"of {entry['from']} (due {entry['due_at']})"
    )


def settle_deadlines(
    settings: Settings, run: SopRun, sop: SopDefinition, *, now: datetime | None = None, lease: str | None = None
) -> int:
    """Open a deviation for each breached or overdue deadline of the run that has none; returns how many.

    ``lease``: what its messages are delivered under (default: the run's, as the walk holds it)."""
    if not sop.deadlines:
        return 0
    now = now or utcnow()
    with read_session(settings.database_url) as s:
        todo = [
            e
            for e in deadline_states(s, run, sop, now)
            if e["state"] in ("breached", "overdue") and e["deviation_id"] is None
        ]
    specs = {d.id: d for d in sop.deadlines}
    n = 0
    for entry in todo:
        spec = specs[entry["id"]]
        limit = timedelta(seconds=entry["limit_seconds"])
        text = spec.deviation.description or _description(entry, limit)
        body: str | Message
        try:  # the message in the institution's language, for people to act on (flows.outputs.messages)
            facts = run_facts(settings, run, sop)
            body = message(
                "deadline",
                facts,
                step=text_in(spec.title, facts.language) or entry["title"],
                limit=limit,
                state=entry["state"],
                classification=spec.deviation.classification,
            )
            title = body.title
        except Exception:  # the deviation is recorded whatever; its message then in plain words
            log.exception("deadline %s of run %s: its message could not be written", spec.id, run.id)
            title = f"[{run.sop_id}] deadline {entry['state']}: {entry['title']}"
            body = (
                f"Run {run.id} of {sop.title}: {_description(entry, limit)}. A {spec.deviation.classification} "
                f"deviation has been opened; the run goes on."
            )
        with write_session(settings.database_url) as s:
            if s.exec(select(Deviation.id).where(Deviation.run_id == run.id, Deviation.step_id == spec.id)).first():
                continue  # the walk and a sweep raced: the other one opened it
            dev = Deviation(
                run_id=run.id,
                step_id=spec.id,
                classification=spec.deviation.classification,
                description=text,
                quarantine=spec.deviation.quarantine,
                opened_at=now,
            )
            ledger.append(s, dev, actor=SYSTEM, action="deviation.open", reason=f"deadline {spec.id} {entry['state']}")
            dev_id = dev.id
            msg = queue(
                s,
                key=f"deadline:{dev_id}",
                institution=run.institution,
                roles=list(spec.deviation.notify),
                title=title,
                body=body,
                lease=lease or run_key(run.flow_run_id),
                run_id=run.id,
            )
            s.expunge(msg)
        n += 1
        emit("sopflow.deviation.opened", run, {"deviation_id": dev_id, "deadline_id": spec.id, "state": entry["state"]})
        try:
            deliver_message(settings, msg)
        except Exception:  # a broken notify.yaml must not undo a recorded deviation
            log.exception("deviation %s of run %s recorded, but its roles could not be told", dev_id, run.id)
    return n


def sweep_deadlines(settings: Settings, *, now: datetime | None = None) -> int:
    """Settle the deadlines of every run still going (the executor's sweep); returns the deviations opened.

    ``now`` is the clock (tests pass one; the executor passes none).
    """
    now = now or utcnow()
    pending: list[tuple[SopRun, SopDefinition]] = []
    with read_session(settings.database_url) as s:
        # Only the runs still going (the current-state index), never the whole history; first the
        # SOP revisions they are pinned to (a handful), then only the runs of those with deadlines.
        is_open = col(CurrentRun.open) == True  # noqa: E712  (an index on open: not IS TRUE)
        pins = s.exec(
            select(col(SopRun.sop_version_id), col(SopRun.sop_sha256))
            .join(CurrentRun, col(CurrentRun.run_id) == col(SopRun.id))
            .where(is_open)
            .distinct()
        ).all()
        sops = {(vid, sha): pinned_sop(s, vid, sha) for vid, sha in pins}  # parsed once per version
        timed = [vid for (vid, _), sop in sops.items() if sop.deadlines]
        going = (
            select(SopRun)
            .join(CurrentRun, col(CurrentRun.run_id) == col(SopRun.id))
            .where(is_open, col(SopRun.sop_version_id).in_(timed))
            .order_by(col(SopRun.started_at))
        )
        for run in s.exec(going) if timed else ():
            sop = sops.get((run.sop_version_id, run.sop_sha256))
            if sop is None or not sop.deadlines:  # the same version under another pin
                continue
            s.expunge(run)
            pending.append((run, sop))
    n = 0
    for run, sop in pending:
        try:
            n += settle_deadlines(settings, run, sop, now=now, lease=job_key("deadlines"))
        except Exception:  # one bad run must not stop the others
            log.exception("deadlines of run %s could not be settled; retrying at the next sweep", run.id)
    return n
