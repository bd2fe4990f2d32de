"""The service floor: what waits on a person. ``inbox`` lists the steps waiting on any role the
user holds, oldest first; ``urgent_inbox`` (the web's) orders them overdue first, then by time
left (a step's time-out, a repetition's due time, or the nearest SOP deadline still counting
down), then oldest. Each item says whether this user may sign it (``guard.signer_problem``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.escalation import overdue_steps
from flows.engine.gates import find_human_step, human_fields
from flows.errors import AuthenticationError
from flows.record.db import init_db, read_session
from flows.record.deadlines import deadline_states, repetitions
from flows.record.state import signers_by_run
from flows.record.tables import CurrentStep, SopRun, StepRecord, utcnow
from flows.record.users import find_user, roles_of
from flows.record.versions import stored_sop
from flows.services import guard
from flows.services.library import institution_timezone
from flows.sop.model import RecordStepSpec, SopDefinition

__all__ = ["inbox", "urgent_inbox"]


def inbox(settings: Settings, username: str) -> list[dict[str, Any]]:
    """The steps waiting now on any role the user holds (oldest first).

    Raises:
        AuthenticationError: no such user.
    """
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        if user is None:
            raise AuthenticationError(f"no user {username!r}")
        overdue = {(o.run.id, o.step.id): o.due for o in overdue_steps(s)}
        # Only the runs with a step waiting now (the current-state index), never the whole history.
        waiting = (
            select(SopRun)
            .where(col(SopRun.id).in_(select(CurrentStep.run_id).where(CurrentStep.status == "waiting")))
            .order_by(col(SopRun.started_at))
        )
        runs = list(s.exec(waiting))
        # Every step's newest record of those runs in one read, in the order the steps appeared
        # (as ``step_states`` gives them).
        newest: dict[str, dict[str, StepRecord]] = {}
        if runs:
            for cur, rec in s.exec(
                select(CurrentStep, StepRecord)
                .join(StepRecord, col(StepRecord.id) == col(CurrentStep.record_id))
                .where(col(CurrentStep.run_id).in_([r.id for r in runs]))
                .order_by(col(CurrentStep.run_id), col(CurrentStep.first_n))
            ):
                newest.setdefault(cur.run_id, {})[cur.step_id] = rec
        held: dict[str, set[str]] = {}
        facts: dict[tuple[str, ...], Any] = {}  # the user's account, roles and training, read once
        signers_by_run(s, [r.id for r in runs], facts)  # and every run's signers, in one read
        for run in runs:
            if run.institution not in held:
                held[run.institution] = roles_of(s, user.id, run.institution)
            roles = held[run.institution]
            if not roles:
                continue
            states = newest.get(run.id, {})
            if not any(rec.status == "waiting" for rec in states.values()):
                continue  # runs between steps: nothing to show, nothing to parse
            sop = stored_sop(s, run)
            clocks: list[dict[str, Any]] | None = None
            for step_id, rec in states.items():
                step = find_human_step(sop, step_id)
                if rec.status == "waiting" and step is not None and step.role in roles:
                    if clocks is None:  # the run's deadlines still counting down (or past due): "time left"
                        clocks = [d for d in deadline_states(s, run, sop) if d["state"] in ("running", "overdue")]
                    out.append(
                        {
                            "run_id": run.id,
                            "sop_id": run.sop_id,
                            "institution": run.institution,
                            "step_id": step_id,
                            "title": step.title or step_id,
                            "role": step.role,
                            "since": rec.at,
                            "timeout": step.timeout,
                            "params": json.loads(run.params_json),
                            "fields": {k: f.model_dump(exclude_none=True) for k, f in human_fields(step).items()},
                            "cannot_sign": guard.signer_problem(s, run, sop, step, user.id, facts=facts),
                            "overdue_since": overdue.get((run.id, step_id)),
                            "deadlines": clocks,
                            "due_at": _repetition_due(s, run.id, sop, step_id, states),
                        }
                    )
    return sorted(out, key=lambda x: x["since"])


def _repetition_due(
    session: Session, run_id: str, sop: SopDefinition, step_id: str, states: dict[str, StepRecord]
) -> str | None:
    """When repetition ``<step>#<n>`` is due (the previous one's signing + ``every``); None otherwise."""
    base, _, n = step_id.partition("#")
    if not n:
        return None
    step = sop.step(base)
    if not isinstance(step, RecordStepSpec):
        return None
    due: str | None = repetitions(session, run_id, step, states)["next_due_at"]
    return due


def _moment(value: datetime | str) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def urgent_inbox(settings: Settings, username: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """``inbox`` with ``due_at`` and ``seconds_left`` (negative: overdue) and the institution's zone,
    most urgent first: overdue steps, then steps with a due time by time left, then the rest oldest first."""
    now = now or utcnow()
    zones: dict[str, str] = {}
    items = inbox(settings, username)
    for it in items:
        due: datetime | None = _moment(it["due_at"]) if it.get("due_at") else None
        if due is None and it["timeout"] is not None:
            due = it["since"] + it["timeout"]
        # The run's SOP deadlines still counting down (thaw to end of infusion…): each shown as
        # time left, and the nearest one ranks the step too.
        it["clocks"] = []
        for clock in it.get("deadlines") or []:
            if not clock.get("due_at"):
                continue
            at = _moment(clock["due_at"])
            it["clocks"].append({"title": clock["title"], "due_at": at, "seconds_left": (at - now).total_seconds()})
            due = at if due is None or at < due else due
        it["due_at"] = due
        it["seconds_left"] = (due - now).total_seconds() if due is not None else None
        if it["institution"] not in zones:
            zones[it["institution"]] = institution_timezone(settings, it["institution"])
        it["timezone"] = zones[it["institution"]]

    def urgency(it: dict[str, Any]) -> tuple[int, float, datetime]:
        left = it["seconds_left"]
        rank = 0 if (left is not None and left < 0) or it.get("overdue_since") else 1 if left is not None else 2
        return rank, left if left is not None else 0.0, it["since"]

    return sorted(items, key=urgency)
