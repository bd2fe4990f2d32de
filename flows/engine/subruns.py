"""Stage 2: sub-runs, deviation handling by SOP, deviation lifecycle events and quarantine holds.

A ``subrun`` step (or a failed check whose ``deviation`` names an ``sop``) opens a run of another
SOP of the institution through ``flows.engine.opening``, the one way every run is opened, with
the same start checks as ``sopflow start`` (parameters, confirmed product, deadline limits,
deviation id, quarantine), but started by the system on behalf of the parent's starter (no
sign-in, no ``start_roles``): the child's ``SopRun`` names ``parent_run_id`` and
``parent_step_id``, and its ``run.start`` audit event says so. When a check refuses the sub-run
(an unconfirmed product, a deadline without a limit, no Effective version…), the parent's link
step is recorded ``held`` with the reason (audited ``run.start.refused``) and waits: the executor's
sweep (``resume_ready``) re-checks it and resumes the parent once the sub-run would start. A
patient's run never fails for a configuration that can be put right.

The parent records the link as step records of the link step (the ``subrun`` step's id, or
``<check>__deviation``): ``waiting`` with ``subrun_id`` before each suspension (each under a new
pause key ``<step>-sub-<n>``), ``done`` with the outcome. Nothing a resume carries is trusted: a
woken parent re-reads the record and goes on only when the child's newest ``RunEvent`` is final
(or, for a deviation, when the deviation has a ``disposition`` event). The child's end (and a
disposition) resumes the parent at once; the executor's sweep (``resume_ready``) repairs a lost one.

Quarantine: before a gate opens or a sub-run starts, a run whose COI is quarantined by another
run's deviation records the step ``held`` (key ``<step>-held-<n>``) and suspends until the
disposition lifts it (``flows.record.deviations.quarantine_problem``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any
from uuid import UUID

from sqlmodel import Session, and_, col, func, or_, select

from flows.config import Settings
from flows.engine.client import api_client, pause_key_prefix
from flows.engine.nudge import nudge
from flows.engine.opening import PreparedRun, open_run, prepare_run
from flows.engine.steps import SYSTEM, RunContext, set_run_status, write_step
from flows.errors import EngineError, FlowsError, NotAuthorizedError
from flows.record.db import read_session, write_session
from flows.record.deviations import (
    append_deviation_event,
    disposition,
    quarantine_problem,
    run_coi,
)
from flows.record.ledger import audit
from flows.record.state import FINAL_STATUSES, run_status, step_data, step_states
from flows.record.tables import CurrentStep, Deviation, SopRun, StepRecord
from flows.record.versions import effective_sop, stored_sop
from flows.sop.expressions import evaluate_value
from flows.sop.model import HUMAN_KINDS, CheckStepSpec, SubrunStepSpec

__all__ = [
    "await_disposition",
    "deviation_link_id",
    "deviation_subrun",
    "hold_if_quarantined",
    "prepare_subrun",
    "resume_ready",
    "run_subrun_step",
    "start_subrun",
]

log = logging.getLogger("sopflow.subruns")


def deviation_link_id(check_id: str) -> str:
    """The parent's step id that links a failed check to its deviation SOP's sub-run."""
    return f"{check_id}__deviation"


# --------------------------------------------------------------------------- starting


def _existing_child(session: Session, parent_id: str, link_id: str) -> SopRun | None:
    return session.exec(
        select(SopRun)
        .where(SopRun.parent_run_id == parent_id, SopRun.parent_step_id == link_id)
        .order_by(col(SopRun.started_at).desc())
    ).first()


def prepare_subrun(
    settings: Settings,
    parent: SopRun,
    link_id: str,
    sop_id: str,
    raw_params: dict[str, Any],
    deviation_id: str | None = None,
) -> PreparedRun:
    """Every check a sub-run must pass before it is recorded (``flows.engine.opening``), on the
    version of ``sop_id`` Effective now; a quarantine that would hold it is a refusal too.

    Raises:
        FlowsError: the refusal (the caller holds the parent's step with it).
    """
    pinned = effective_sop(settings, parent.institution, sop_id)
    if deviation_id is not None:  # the contract's three params, those the deviation SOP declares
        raw_params = {k: v for k, v in raw_params.items() if k in pinned.definition.params}
    prepared = prepare_run(
        settings,
        parent.institution,
        pinned,
        {k: v for k, v in raw_params.items() if v is not None},
        where=f"{sop_id} params (sub-run of {parent.sop_id} step {link_id!r})",
        lineage=parent.id,
    )
    if prepared.held_by is not None:
        raise NotAuthorizedError(prepared.held_by)
    return prepared


def start_subrun(
    ctx: RunContext, link_id: str, sop_id: str, raw_params: dict[str, Any], *, deviation_id: str | None = None
) -> str:
    """Start (once) the sub-run of ``link_id``; returns its run id.

    Raises:
        FlowsError: a start check refused it (``prepare_subrun``); EngineError: Prefect is unreachable.
    """
    with read_session(ctx.url) as s:
        existing = _existing_child(s, ctx.run.id, link_id)
        if existing is not None:
            return existing.id
    prepared = prepare_subrun(ctx.settings, ctx.run, link_id, sop_id, raw_params, deviation_id)

    def deviation_event(session: Session, run_id: str) -> None:
        if deviation_id is not None:
            append_deviation_event(
                session,
                deviation_id,
                "subrun",
                {"run_id": run_id, "sop_id": sop_id},
                run_id=ctx.run.id,
                step_id=link_id,
            )

    opened = open_run(
        ctx.settings,
        ctx.run.institution,
        prepared,
        started_by=ctx.run.started_by,
        actor=SYSTEM,
        reason=f"sub-run of run {ctx.run.id} step {link_id!r}, on behalf of its starter",
        parent_run_id=ctx.run.id,
        parent_step_id=link_id,
        also=deviation_event,
    )
    return opened.run_id


async def _start_or_hold(
    ctx: RunContext, link_id: str, kind: str, sop_id: str, params: dict[str, Any], deviation_id: str | None = None
) -> str:
    """``start_subrun``; while a start check refuses it, record the link step ``held`` with the
    reason (audited ``run.start.refused`` by ``system``) and suspend until the sweep sees it pass."""
    while True:
        try:
            return start_subrun(ctx, link_id, sop_id, params, deviation_id=deviation_id)
        except EngineError:
            raise
        except FlowsError as exc:
            problem = f"sub-run {sop_id} cannot start: {exc}"
            log.error("run %s step %s: %s", ctx.run.id, link_id, problem)
            with write_session(ctx.url) as s:
                audit(
                    s,
                    actor=SYSTEM,
                    action="run.start.refused",
                    object_type="sf_run",
                    object_id=sop_id,
                    payload={"parent_run_id": ctx.run.id, "step_id": link_id, "problem": problem},
                    reason=problem,
                )
            data = {
                "problem": problem,
                "cause": "start",
                "sop_id": sop_id,
                "params": params,
                "deviation_id": deviation_id,
            }
            await _suspend(ctx, link_id, kind, "held", data, f"{link_id}: held: {problem}", reason=problem)


# --------------------------------------------------------------------------- waiting


def _outcome(session: Session, child_id: str, deviation_id: str | None) -> dict[str, Any] | None:
    """What the parent sees of its sub-run, or None while it has nothing to see yet."""
    child = session.get(SopRun, child_id)
    status = run_status(session, child_id)
    decided = disposition(session, deviation_id) if deviation_id is not None else None
    decision = decided["decision"] if decided else None
    ended = status is not None and status.status in FINAL_STATUSES
    if child is None or (not ended and decision is None):
        return None
    out: dict[str, Any] = {}
    for sid, rec in step_states(session, child_id).items():
        if rec.status == "done" and (rec.kind in HUMAN_KINDS or rec.kind == "subrun"):
            out[sid] = step_data(rec)
    out.update(
        {
            "run_id": child_id,
            "sop_id": child.sop_id,
            "status": status.status if status else "unknown",
            "status_detail": status.detail if status else None,
        }
    )
    if deviation_id is not None:
        out.update(
            {
                "deviation_id": deviation_id,
                "decision": decision,
                "reason": decided["reason"] if decided else None,
                "disposition": decided["value"] if decided else None,
            }
        )
    return out


def _count(session: Session, run_id: str, step_id: str, status: str) -> int:
    return int(
        session.exec(
            select(func.count())
            .select_from(StepRecord)
            .where(StepRecord.run_id == run_id, StepRecord.step_id == step_id, StepRecord.status == status)
        ).one()
    )


async def _suspend(
    ctx: RunContext, step_id: str, kind: str, status: str, data: dict[str, Any], detail: str, reason: str | None = None
) -> None:
    """Record the step ``status`` (a new record each time: each suspension gets its own key) and suspend."""
    from prefect.flow_runs import suspend_flow_run

    with write_session(ctx.url) as s:
        write_step(s, ctx.run.id, step_id, kind, status, data, reason=reason)
        set_run_status(s, ctx.run.id, "waiting", detail)
        n = _count(s, ctx.run.id, step_id, status)
    # Prefect's sync_compatible decorator hides the coroutine from type checkers.
    await suspend_flow_run(key=f"{pause_key_prefix(step_id)}{'sub' if status == 'waiting' else 'held'}-{n}")  # type: ignore[misc]


async def _await_child(
    ctx: RunContext, link_id: str, kind: str, child_id: str, deviation_id: str | None
) -> dict[str, Any]:
    while True:
        with write_session(ctx.url) as s:
            rec = step_states(s, ctx.run.id).get(link_id)
            if rec is not None and rec.status == "done":
                return step_data(rec)
            outcome = _outcome(s, child_id, deviation_id)
            if outcome is not None:
                set_run_status(s, ctx.run.id, "running")
                write_step(s, ctx.run.id, link_id, kind, "done", outcome)
                return outcome
        await _suspend(
            ctx,
            link_id,
            kind,
            "waiting",
            {"subrun_id": child_id, "deviation_id": deviation_id},
            f"{link_id}: waits for sub-run {child_id}",
        )


async def run_subrun_step(ctx: RunContext, step: SubrunStepSpec) -> dict[str, Any]:
    """A ``subrun`` step: start the sub-run (once) and, with ``wait``, wait until it ends."""
    rec = ctx.states.get(step.id)
    if rec is not None and rec.status == "done":
        return step_data(rec)
    if rec is None or rec.status == "held":
        await hold_if_quarantined(ctx, step.id, "subrun")
    context = ctx.expression_context()
    params = {name: evaluate_value(expr, context, "sub-run param") for name, expr in step.params.items()}
    child_id = await _start_or_hold(ctx, step.id, "subrun", step.sop, params)
    if not step.wait:
        with write_session(ctx.url) as s:
            data = {"run_id": child_id, "sop_id": step.sop, "status": "started"}
            write_step(s, ctx.run.id, step.id, "subrun", "done", data)
        return data
    return await _await_child(ctx, step.id, "subrun", child_id, None)


async def deviation_subrun(ctx: RunContext, check: CheckStepSpec, *, wait: bool) -> dict[str, Any] | None:
    """A failed check whose deviation names an SOP: start it as a sub-run (params ``deviation_id``,
    ``coi``, ``parent_run_id``) and, with ``wait``, wait for its disposition. Returns
    ``{"decision": ...}``, or None when there is nothing to decide by (``wait`` false, or the sub-run
    ended without a disposition: the inline ``<check>__disposition`` step decides then)."""
    link = deviation_link_id(check.id)
    with read_session(ctx.url) as s:
        dev = s.exec(
            select(Deviation)
            .where(Deviation.run_id == ctx.run.id, Deviation.step_id == check.id)
            .order_by(col(Deviation.opened_at).desc())
        ).first()
    if dev is None or check.deviation.sop is None:
        return None
    params = {"deviation_id": dev.id, "coi": run_coi(ctx.run, ctx.sop), "parent_run_id": ctx.run.id}
    child_id = await _start_or_hold(ctx, link, "subrun", check.deviation.sop, params, deviation_id=dev.id)
    if not wait:
        return None
    outcome = await _await_child(ctx, link, "subrun", child_id, dev.id)
    return outcome if outcome.get("decision") else None


async def await_disposition(ctx: RunContext, link_id: str, child_id: str, deviation_id: str) -> dict[str, Any]:
    """Hold the run at ``link_id`` until deviation ``deviation_id``'s handling run ``child_id``
    decides its disposition (or ends); a hold at completion (``run_sop._hold``) waits so."""
    return await _await_child(ctx, link_id, "subrun", child_id, deviation_id)


# --------------------------------------------------------------------------- quarantine


def _quarantine(ctx: RunContext) -> str | None:
    params = json.loads(ctx.run.params_json)
    with read_session(ctx.url) as s:
        return quarantine_problem(
            s, run_coi(ctx.run, ctx.sop), run_id=ctx.run.id, deviation_id=params.get("deviation_id")
        )


async def hold_if_quarantined(ctx: RunContext, step_id: str, kind: str) -> None:
    """Return at once unless the run's dose is quarantined; else hold the step until the disposition."""
    while (problem := _quarantine(ctx)) is not None:
        await _suspend(ctx, step_id, kind, "held", {"problem": problem}, f"{step_id}: held: {problem}", reason=problem)


# --------------------------------------------------------------------------- resuming


def _paused_key(client: Any, flow_run_id: str) -> str | None:
    state = client.read_flow_run(UUID(flow_run_id)).state
    return str(state.state_details.pause_key or "") if state is not None and state.is_paused() else None


def resume_ready(settings: Settings, client: Any = None) -> int:
    """Resume every run suspended on a sub-run that has ended (or been dispositioned), every run
    held by a quarantine that is lifted, and every run whose sub-run a start check refused once that
    check passes. The executor's sweep calls it; so do a sub-run's end and a disposition, at once.
    Best effort: returns how many it resumed."""
    ready: list[tuple[str, str]] = []
    with read_session(settings.database_url) as s:
        # The steps whose newest record waits or is held now (the current-state index), never every record.
        newest = s.exec(
            select(StepRecord, SopRun)
            .join(CurrentStep, col(CurrentStep.record_id) == col(StepRecord.id))
            .join(SopRun, col(SopRun.id) == col(StepRecord.run_id))
            # Only a held step or one waiting on a sub-run: the steps waiting on a person (nearly
            # all of them) are not read at all. LIKE's ``_`` matches any character: the test below decides.
            .where(
                or_(
                    col(CurrentStep.status) == "held",
                    and_(col(CurrentStep.status) == "waiting", col(StepRecord.data_json).like('%"subrun_id"%')),
                )
            )
            .order_by(col(StepRecord.run_id), col(StepRecord.n))
        )
        for rec, run in list(newest):
            if rec.status == "held" or "subrun_id" in rec.data_json:
                _ready(settings, s, run, rec, ready)
    return _resume_each(settings, client, ready)


def _ready(settings: Settings, s: Session, run: SopRun, rec: StepRecord, ready: list[tuple[str, str]]) -> None:
    """Add (flow run, pause key) when ``rec`` (the newest record of its step) may go on: its sub-run
    ended or was dispositioned, the quarantine that held it is lifted, or the sub-run a start check
    refused would now start."""
    d = step_data(rec)
    if rec.status == "waiting":
        if _outcome(s, d["subrun_id"], d.get("deviation_id")) is None:
            return
        key = f"{pause_key_prefix(rec.step_id)}sub-"
    elif d.get("cause") == "start":
        try:
            prepare_subrun(settings, run, rec.step_id, d["sop_id"], d["params"], d.get("deviation_id"))
        except FlowsError:
            return
        key = f"{pause_key_prefix(rec.step_id)}held-"
    else:
        params = json.loads(run.params_json)
        problem = quarantine_problem(
            s, run_coi(run, stored_sop(s, run)), run_id=run.id, deviation_id=params.get("deviation_id")
        )
        if problem is not None:
            return
        key = f"{pause_key_prefix(rec.step_id)}held-"
    ready.append((run.flow_run_id, key))


def _resume_each(settings: Settings, client: Any, ready: list[tuple[str, str]]) -> int:
    """Resume each (flow run, key) still paused under that key; best effort, returns how many."""
    if not ready:
        return 0
    n = 0
    try:
        with contextlib.nullcontext(client) if client is not None else api_client(settings) as c:
            for flow_run_id, key in ready:
                try:
                    paused = _paused_key(c, flow_run_id)
                    if paused and paused.startswith(key):
                        c.resume_flow_run(UUID(flow_run_id))
                        n += 1
                except Exception as exc:  # one bad run must not stop the others
                    log.error("cannot resume flow run %s (%s): %s", flow_run_id, key, exc)
    except Exception as exc:
        log.error("resume sweep failed: %s", exc)
    if n:
        nudge(settings)
    return n
