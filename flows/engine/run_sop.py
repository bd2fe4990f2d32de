"""Stage 2: ``run-sop``, the one Prefect flow that walks an SOP's steps.

The flow takes only sopflow's run id; everything else (the pinned SOP text, parameters, product
limits, entered data) is read from sopflow's record. Automated steps run as tasks named
``{sop_id}/{step_id}``. A human step records that it waits, tells the role, and suspends the flow
(``suspend_flow_run``): no process is held while it waits. A resume must carry the id of a
Signature that sopflow created; the gate re-checks it against the record before going on.

After every resume the flow runs again from the top; steps whose record says ``done`` are
skipped without touching Prefect, so a resumed run costs little and never repeats a step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import SyncClientContext, TaskRunContext
from prefect.flow_runs import suspend_flow_run
from prefect.utilities.annotations import quote

from flows.config import get_settings
from flows.engine import subruns
from flows.engine.client import pause_key_prefix
from flows.engine.deadlines import settle_deadlines
from flows.engine.faults import fault_point
from flows.engine.gates import (
    accept_signature,
    disposition_step,
    hold_step,
    open_gate,
    repetition,
    stale_resume,
)
from flows.engine.inputs import SignedInput
from flows.engine.operators import emit
from flows.engine.outbox import deliver_message, flush_run
from flows.engine.steps import (
    AUTOMATED,
    RunContext,
    load_context,
    run_when,
    set_run_status,
    write_step,
)
from flows.errors import FlowsError
from flows.record.db import read_session, write_session
from flows.record.deviations import handling_run_id, hold_step_id, holding_deviations
from flows.record.state import refused_count, step_data, step_states
from flows.sop.expressions import ExpressionError, evaluate_check
from flows.sop.model import (
    CheckStepSpec,
    HumanStepSpec,
    RecordStepSpec,
)

__all__ = ["FLOW_NAME", "run_sop"]

FLOW_NAME = "run-sop"


def _task_run_id() -> str | None:
    ctx = TaskRunContext.get()
    return str(ctx.task_run.id) if ctx and ctx.task_run else None


@task(name="step", cache_policy=NO_CACHE, persist_result=False)
def step_task(ctx: RunContext, step_id: str) -> Any:
    """Run one automated step (check, document, notify) with its handler from ``AUTOMATED``."""
    step = ctx.sop.step(step_id)
    return AUTOMATED[step.kind](ctx, step, _task_run_id())


@task(name="gate", cache_policy=NO_CACHE, persist_result=False)
def gate_task(ctx: RunContext, step: HumanStepSpec) -> None:
    """Record that a human step waits and, the first time, tell its role (through the outbox)."""
    msg = open_gate(ctx, step)
    if msg is None:
        return
    emit("sopflow.step.waiting", ctx.run, {"step_id": step.id, "kind": step.kind, "role": step.role})
    try:
        deliver_message(ctx.settings, msg)
    except FlowsError as exc:  # e.g. a broken notify.yaml: the step still waits, the log says why
        get_run_logger().error("step %s waits, but its role could not be notified: %s", step.id, exc)


def _accepted(
    ctx: RunContext, step: HumanStepSpec, signature_id: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """``accept_signature``, and the event that says how it went."""
    data, problem = accept_signature(ctx, step, signature_id)
    if data is not None:
        emit("sopflow.step.signed", ctx.run, {"step_id": step.id, "kind": step.kind, "role": step.role})
    else:
        emit("sopflow.step.refused", ctx.run, {"step_id": step.id, "kind": step.kind, "problem": problem})
    return data, problem


async def _human(ctx: RunContext, step: HumanStepSpec) -> dict[str, Any]:
    """Wait for this step's signed input; returns its data once the gate accepts it."""
    logger = get_run_logger()
    while True:
        ctx.refresh()
        rec = ctx.states.get(step.id)
        if rec is not None and rec.status == "done":
            return step_data(rec)
        if rec is not None and rec.status == "signed":
            data, problem = _accepted(ctx, step, None)
            if data is not None:
                return data
            logger.warning("step %s: refused: %s", step.id, problem)
            continue
        if rec is None or rec.status == "held":  # a quarantined dose opens no further gate
            await subruns.hold_if_quarantined(ctx, step.id, step.kind)
        # quote(): see _walk_task; Prefect's task signature does not know it (hence the ignore).
        gate_task.with_options(task_run_name=f"{ctx.run.sop_id}/{step.id}")(quote(ctx), quote(step))  # type: ignore[call-overload]
        with read_session(ctx.url) as s:
            if (now := step_states(s, ctx.run.id).get(step.id)) is not None and now.status == "signed":
                continue  # signed while the gate opened: no need to suspend at all
            # A refused resume moves the gate to the next key: Prefect hands out each key's input once.
            key = f"{pause_key_prefix(step.id)}{refused_count(s, ctx.run.id, step.id)}"
        signed = await suspend_flow_run(wait_for_input=SignedInput, key=key)  # type: ignore[misc]  # sync_compatible
        if stale_resume(ctx, step, signed.signature_id):
            logger.info("step %s: ignored a late duplicate resume for another step; waiting again", step.id)
            continue
        data, problem = _accepted(ctx, step, signed.signature_id)
        if data is not None:
            return data
        logger.warning("step %s: refused a resume: %s", step.id, problem)


async def _repeat(ctx: RunContext, step: RecordStepSpec) -> None:
    """Repetitions ``<step>#1``, ``#2``, … each signed on its own, until ``until`` holds or ``times``
    are done; then one ``done`` record for the step itself says how many and why it ended."""
    repeat = step.repeat
    if repeat is None:
        raise ValueError(f"step {step.id!r} is not repeated")
    n = 1
    while True:
        await _human(ctx, repetition(step, n))
        ctx.refresh()
        ended_by = None
        if repeat.until is not None:
            try:
                if evaluate_check(repeat.until, ctx.expression_context()):
                    ended_by = "until"
            except ExpressionError as exc:  # keep measuring: stopping early is the worse error
                get_run_logger().warning("step %s: 'until' could not be evaluated, repeating: %s", step.id, exc)
        if ended_by is None and n >= repeat.times:
            ended_by = "times"
        if ended_by is not None:
            with write_session(ctx.url) as s:
                rec = step_states(s, ctx.run.id).get(step.id)
                if rec is None or rec.status != "done":
                    write_step(s, ctx.run.id, step.id, step.kind, "done", {"repetitions": n, "ended_by": ended_by})
            return
        n += 1


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=True)
async def run_sop(
    run_id: str,
    institution: str | None = None,
    sop_id: str | None = None,
    sop_version: int | None = None,
    coi: str | None = None,
) -> dict[str, Any]:
    """Walk the steps of sopflow run ``run_id`` to the end, suspending at each human step.

    ``institution``, ``sop_id``, ``sop_version`` and ``coi`` are there for people reading the run in
    Prefect (``flows.engine.operators``); the flow reads what it acts on from sopflow's record only.
    Nothing persists its result: the record is the result, so workers need no shared result storage.
    """
    # One sync API client for the whole run (a worker's lane already holds one; ``get_or_create``
    # reuses it): without it every sync task called from this async flow builds its own client and
    # loads the CA bundle (90 ms a task against 7 ms, bench/engine.py).
    with SyncClientContext.get_or_create():
        return await _walk(get_settings(), run_id)


async def _walk(settings: Any, run_id: str) -> dict[str, Any]:
    ctx = load_context(settings, run_id)
    flush_run(settings, run_id)  # a crash may have left a message recorded and not delivered
    settle_deadlines(ctx.settings, ctx.run, ctx.sop)
    running = False
    for step in ctx.sop.steps:
        # Steps already done are skipped on what was read once: a resume costs the same at the
        # first step as at the fiftieth, with no database or Prefect call for what is behind it.
        rec = ctx.states.get(step.id)
        if rec is not None and rec.status == "skipped":
            continue
        if rec is not None and rec.status == "done":
            if step.kind == "approve" and step_data(rec).get("decision") == "reject" and not _disposes(step):
                # Re-entered after a crash between the signed reject and the run's end: still rejected.
                return _finish(ctx, "rejected", f"{step.id}: {step_data(rec).get('reason') or 'rejected'}")
            continue
        if not running:  # a re-entered run whose steps are all done writes nothing at all
            with write_session(ctx.url) as s:
                set_run_status(s, run_id, "running")
            running = True
        if rec is None and step.when is not None and f"{step.id}#1" not in ctx.states:
            go, problem = run_when(ctx, step)
            if problem:
                get_run_logger().warning("step %s runs: its 'when' could not be evaluated: %s", step.id, problem)
            if not go:
                ctx.refresh()
                continue
        fault_point("step.start", f"{ctx.run.sop_id}/{step.id}")
        end = await WALKS[step.kind](ctx, step, rec)
        settle_deadlines(ctx.settings, ctx.run, ctx.sop)  # a step just recorded may end (or breach) a deadline
        ctx.refresh()
        if end is not None:
            return _finish(ctx, *end)
    held = await _hold(ctx)
    return _finish(ctx, *(held or ("completed", None)))


async def _hold(ctx: RunContext) -> End:
    """A run with an open major or critical deviation neither completes nor releases its dose until
    the disposition is signed (issue 15): by its handling run when one was started on it, else by QA
    at the run's hold step. A disposition that rejects the dose ends the run rejected."""
    while True:
        with read_session(ctx.url) as s:
            holding = holding_deviations(s, ctx.run.id)
            if not holding:
                return None
            dev, decided = holding[0]
            handling = handling_run_id(s, dev.id) if decided is None else None
            s.expunge(dev)
        if decided is not None:  # decided already, against the dose
            return (
                "rejected",
                f"deviation {dev.id[:8]} ({dev.classification}): disposition: reject ({decided.get('reason')})",
            )
        get_run_logger().info("run held by %s deviation %s until its disposition is signed", dev.classification, dev.id)
        link = f"{hold_step_id(dev.id)}__handling"
        ctx.refresh()
        if handling is not None and (ctx.states.get(link) is None or ctx.states[link].status != "done"):
            # Its handling run decides; the run waits for it like for a sub-run (then, if that run
            # ended without a disposition, QA signs one at the hold step).
            await subruns.await_disposition(ctx, link, handling, dev.id)
            continue
        step = hold_step(hold_step_id(dev.id))
        if step is None:  # cannot happen: hold_step_id makes a hold step's id
            raise ValueError(f"deviation {dev.id}: no hold step")
        await _human(ctx, step)
        subruns.resume_ready(ctx.settings)  # a disposition lifts a quarantine: held runs go on


End = tuple[str, str | None] | None
"""What walking one step says: None (go on to the next), or the run's final (status, detail)."""


async def _walk_human(ctx: RunContext, step: Any, rec: Any) -> End:
    """record, verify, approve: wait for the signed input; a rejecting approval ends the run."""
    if isinstance(step, RecordStepSpec) and step.repeat is not None:
        await _repeat(ctx, step)
        return None
    data = await _human(ctx, step)
    if _disposes(step):  # a waiting parent, held runs
        subruns.resume_ready(ctx.settings)
    if step.kind == "approve" and data.get("decision") == "reject" and not _disposes(step):
        return "rejected", f"{step.id}: {data.get('reason') or 'rejected'}"
    return None


async def _walk_task(ctx: RunContext, step: Any, rec: Any) -> End:
    """document, notify (and a check's evaluation): the kind's handler as a Prefect task, once."""
    if rec is None:
        # quote(): Prefect would otherwise walk the whole run context (SOP, run row) on every call.
        step_task.with_options(task_run_name=f"{ctx.run.sop_id}/{step.id}")(quote(ctx), step.id)  # type: ignore[call-overload]
        ctx.refresh()
    return None


async def _walk_check(ctx: RunContext, step: Any, rec: Any) -> End:
    """check: evaluate it; a failure waits for the deviation's disposition (by sub-run or inline)."""
    await _walk_task(ctx, step, rec)
    if not isinstance(step, CheckStepSpec) or ctx.states[step.id].status != "failed":
        return None
    decision = None
    if step.deviation.sop is not None:  # handled by the deviation SOP as a sub-run
        decision = await subruns.deviation_subrun(ctx, step, wait=step.on_fail != "stop")
    if step.on_fail == "stop":
        return "stopped", f"{step.id}: check failed; deviation opened"
    if decision is None:
        decision = await _human(ctx, disposition_step(step))
        subruns.resume_ready(ctx.settings)  # the disposition lifts a quarantine: held runs go on
    if decision.get("decision") != "approve":  # only approve (use with documented risk) goes on
        return "rejected", f"{step.id}: deviation disposition: {decision.get('decision')} ({decision.get('reason')})"
    return None


async def _walk_subrun(ctx: RunContext, step: Any, rec: Any) -> End:
    """subrun: start the linked run (once) and, with ``wait``, wait for its end."""
    await subruns.run_subrun_step(ctx, step)
    return None


WALKS: dict[str, Callable[[RunContext, Any, Any], Awaitable[End]]] = {
    "record": _walk_human,
    "verify": _walk_human,
    "approve": _walk_human,
    "check": _walk_check,
    "document": _walk_task,
    "notify": _walk_task,
    "subrun": _walk_subrun,
}
"""How the walk takes each step kind of ``flows.sop.model.STEP_KINDS`` (one row each; the human
kinds share one). ``tests/test_step_kinds.py`` checks both tables name the same kinds."""


def _disposes(step: Any) -> bool:
    """A deviation SOP's disposition rejects the dose (its parent ends), not the deviation's own run:
    containment, CAPA and closure still follow."""
    return getattr(step, "updates_deviation", None) == "disposition"


def _finish(ctx: RunContext, status: str, detail: str | None) -> dict[str, Any]:
    settle_deadlines(ctx.settings, ctx.run, ctx.sop)
    with write_session(ctx.url) as s:
        set_run_status(s, ctx.run.id, status, detail)
    if ctx.run.parent_run_id is not None:  # the parent may wait for this sub-run
        subruns.resume_ready(ctx.settings)
    return {"run_id": ctx.run.id, "status": status, "detail": detail}
