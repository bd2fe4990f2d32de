"""Stage 2: human steps: what a signer fills in, and how the flow accepts or refuses a signature.

No Prefect here: ``run_sop`` suspends and resumes; this module decides, against the record,
whether the signature a resume names is the one sopflow recorded for this run and step, made by
someone allowed to sign it, over exactly the data stored. Anything else is refused and audited.
A step with ``updates_deviation`` appends its deviation's lifecycle event in the same transaction
as its acceptance (``record_lifecycle``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlmodel import Session, col, select

from flows.engine.leases import run_key
from flows.engine.outbox import queue
from flows.engine.steps import SYSTEM, RunContext, set_run_status, write_step
from flows.outputs.messages import Message, message
from flows.record.db import write_session
from flows.record.deviations import HOLD_ROLE, append_deviation_event, hold_deviation
from flows.record.dose import run_facts
from flows.record.ledger import audit, verify_signature
from flows.record.query import disposition_id
from flows.record.state import STALE_RESUME, signer_problem, step_data, step_states
from flows.record.tables import Deviation, OutboxMessage, Signature, StepRecord, utcnow
from flows.sop.model import (
    ApproveStepSpec,
    CheckStepSpec,
    FieldSpec,
    HumanStepSpec,
    RecordStepSpec,
    text_in,
)

__all__ = [
    "MEANINGS",
    "accept_signature",
    "disposition_step",
    "find_human_step",
    "hold_step",
    "human_fields",
    "meaning_of",
    "open_gate",
    "record_lifecycle",
    "repetition",
    "stale_resume",
]

log = logging.getLogger("sopflow.gates")

MEANINGS = {"record": "performed", "verify": "verified", "approve": "approved"}

_DECISION = FieldSpec(type="choice", choices=("approve", "reject"), label="Decision")
_REASON = FieldSpec(type="text", required=False, max_length=2000, multiline=True, label="Reason (required to reject)")


def human_fields(step: HumanStepSpec) -> dict[str, FieldSpec]:
    """The fields a signer submits: the SOP's, plus decision and reason on approve steps."""
    if isinstance(step, ApproveStepSpec):
        return {**step.fields, "decision": _DECISION, "reason": _REASON}
    return dict(step.fields)


def meaning_of(step: HumanStepSpec, data: dict[str, Any]) -> str:
    if isinstance(step, ApproveStepSpec):
        return "rejected" if data.get("decision") == "reject" else step.signs_as
    return MEANINGS[step.kind]


def disposition_step(check: CheckStepSpec) -> ApproveStepSpec:
    """The signed decision a failed check waits for: use the dose with documented risk, or reject it."""
    return ApproveStepSpec(
        kind="approve",
        id=disposition_id(check.id),
        role=check.deviation.disposition_role,
        title=f"Deviation disposition for {check.title or check.id}",
        meaning="Disposition of a deviation: approve = use with documented risk acceptance; reject = reject the dose",
        updates_deviation="disposition",
    )


_HOLD_PREFIX, _HOLD_SUFFIX = "deviation_", "__disposition"


def hold_step(step_id: str) -> ApproveStepSpec | None:
    """The signed disposition a run's hold waits for (``flows.record.deviations.hold_step_id``), or
    None when ``step_id`` is no hold step: QA approves (use with documented risk acceptance: the run
    goes on to complete) or rejects the dose (the run ends rejected)."""
    inner = step_id.removeprefix(_HOLD_PREFIX).removesuffix(_HOLD_SUFFIX)
    if not (step_id.startswith(_HOLD_PREFIX) and step_id.endswith(_HOLD_SUFFIX)) or len(inner) != 12:
        return None
    if any(c not in "0123456789abcdef" for c in inner):
        return None
    return ApproveStepSpec(
        kind="approve",
        id=step_id,
        role=HOLD_ROLE,
        title=f"Disposition of deviation {inner[:8]}: the run is held until it is signed",
        meaning="Disposition of a deviation: approve = use with documented risk acceptance; reject = reject the dose",
        updates_deviation="disposition",
    )


def open_gate(ctx: RunContext, step: HumanStepSpec) -> OutboxMessage | None:
    """Record that the step, and so the run, waits for signed input, and queue the message that
    tells its role (one transaction, so nobody sees one without the other, and the message is
    recorded before anyone delivers it). Returns the message when the step begins to wait now (it
    is to be delivered then); None when it already waited. The run's status detail is the step id;
    at a hold step it also says why the run is held."""
    with write_session(ctx.url) as s:
        states = step_states(s, ctx.run.id)
        rec = states.get(step.id)
        set_run_status(s, ctx.run.id, "waiting", _detail(s, ctx, step))
        if rec is not None and rec.status in ("waiting", "signed", "done"):
            return None
        waiting = write_step(s, ctx.run.id, step.id, step.kind, "waiting", {"role": step.role})
        if rec is not None and rec.status != "held":
            return None  # a refused resume: it waits again, and its role was told already
        title, body = _waiting_message(ctx, step)
        msg = queue(
            s,
            key=f"waiting:{waiting.id}",
            institution=ctx.run.institution,
            roles=[step.role],
            title=title,
            body=body,
            lease=run_key(ctx.run.flow_run_id),
            run_id=ctx.run.id,
        )
        s.flush()
        s.expunge(msg)
        return msg


def _detail(session: Session, ctx: RunContext, step: HumanStepSpec) -> str:
    dev = hold_deviation(session, ctx.run.id, step.id)
    if dev is None:
        return step.id
    return (
        f"{step.id}: held: {dev.classification} deviation {dev.id[:8]} ({dev.description}) is open; the run "
        f"completes only once role {HOLD_ROLE!r} signs its disposition"
    )


def _waiting_message(ctx: RunContext, step: HumanStepSpec) -> tuple[str, str | Message]:
    """What tells the role a step waits: the dose, the step, due when, a link (``flows.outputs.messages``);
    in plain words when the run's facts cannot be read (the step waits whatever)."""
    try:
        facts = run_facts(ctx.settings, ctx.run, ctx.sop)
        due = utcnow() + step.timeout if step.timeout else None
        shown = text_in(step.title, facts.language) or step.title or step.id
        msg = message("waiting", facts, step=shown, step_id=step.id, role=step.role, due_at=due)
        return msg.title, msg
    except Exception:  # the message is a courtesy; the record is what matters
        log.exception("run %s step %s: the waiting message could not be written", ctx.run.id, step.id)
        title = str(step.title or step.id)
        return f"[{ctx.run.sop_id}] waiting on you: {title}", (
            f"Run {ctx.run.id} waits for {step.role!r} to sign step {step.id!r}: {title}. `sopflow inbox` lists it."
        )


def accept_signature(
    ctx: RunContext, step: HumanStepSpec, signature_id: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """Accept the step's signed input, or refuse it. Returns (data, None) or (None, problem).

    ``signature_id`` is what the resume carried (None: take the signed record as it stands,
    used when a run is re-entered after a crash).
    """
    with write_session(ctx.url) as s:
        rec = step_states(s, ctx.run.id).get(step.id)
        problem: str | None = None
        if rec is None or rec.status != "signed":
            status = rec.status if rec else "none"
            problem = f"a resume named signature {signature_id!r} but step {step.id!r} has no signed input (status {status!r})"
        elif signature_id is not None and rec.signature_id != signature_id:
            problem = f"a resume named signature {signature_id!r}, not the one sopflow recorded for step {step.id!r}"
        else:
            sig = s.get(Signature, rec.signature_id)
            if sig is None or sig.run_id != ctx.run.id or sig.step_id != step.id:
                problem = f"signature {rec.signature_id!r} is not a signature on step {step.id!r} of this run"
            else:
                problem = verify_signature(s, sig) or signer_problem(s, ctx.run, ctx.sop, step, sig.user_id)
        if problem is not None or rec is None:  # rec is None only with a problem: narrowed for the reader
            write_step(
                s,
                ctx.run.id,
                step.id,
                step.kind,
                "refused",
                {"signature_id": signature_id, "problem": problem},
                reason=problem,
            )
            return None, problem
        data = step_data(rec)
        write_step(
            s,
            ctx.run.id,
            step.id,
            step.kind,
            "done",
            data,
            actor=rec.actor_id or "system",
            actor_id=rec.actor_id,
            signature_id=rec.signature_id,
        )
        if step.updates_deviation is not None:  # the deviation's lifecycle event, in the same transaction
            record_lifecycle(s, ctx, step, data, rec)
        return data, None


def stale_resume(ctx: RunContext, step: HumanStepSpec, signature_id: str) -> bool:
    """True (and audited) when a resume carried the signature of another step of this run that is
    already done: a late duplicate of a resume that was delivered (the signer's own and the
    executor's sweep can cross; Prefect files an input under whatever key the run is paused at).
    It is no forgery and nobody's fault: the gate stays ``waiting`` and suspends under a fresh key."""
    with write_session(ctx.url) as s:
        sig = s.get(Signature, signature_id)
        if sig is None or sig.run_id != ctx.run.id or sig.step_id == step.id:
            return False
        other = step_states(s, ctx.run.id).get(sig.step_id)
        if other is None or other.status != "done" or other.signature_id != sig.id:
            return False
        audit(
            s,
            actor=SYSTEM,
            action=STALE_RESUME,
            object_type="sf_step",
            object_id=f"{ctx.run.id}/{step.id}",
            payload={"signature_id": signature_id, "signed_step": sig.step_id},
            reason=f"a late duplicate resume for step {sig.step_id!r} (already accepted) reached step {step.id!r}",
        )
        return True


def repetition(step: RecordStepSpec, n: int) -> RecordStepSpec:
    """Repetition ``n`` (1, 2, …) of a repeated record step: the same step, signed as ``<step>#<n>``."""
    return step.model_copy(update={"id": f"{step.id}#{n}"})


def find_human_step(sop: Any, step_id: str) -> HumanStepSpec | None:
    """The human step (a failed check's disposition step, a repetition ``<step>#<n>``) with this id, if any."""
    base, _, n = step_id.partition("#")
    if n:
        step = next((s for s in sop.steps if s.id == base), None)
        if (
            isinstance(step, RecordStepSpec)
            and step.repeat is not None
            and n.isdigit()
            and 1 <= int(n) <= step.repeat.times
        ):
            return repetition(step, int(n))
        return None
    for step in sop.steps:
        if step.id == step_id and isinstance(step, HumanStepSpec):
            return step
        if isinstance(step, CheckStepSpec) and disposition_id(step.id) == step_id:
            return disposition_step(step)
    return hold_step(step_id)


# -- deviation lifecycle -----------------------------------------------------------------------------
def record_lifecycle(
    session: Session, ctx: RunContext, step: HumanStepSpec, data: dict[str, Any], rec: StepRecord
) -> None:
    """A step with ``updates_deviation`` was accepted: append the deviation's event (same transaction)."""
    kind = getattr(step, "updates_deviation", None)
    if kind is None:
        return
    deviation_id = json.loads(ctx.run.params_json).get("deviation_id")
    held = hold_deviation(session, ctx.run.id, step.id)
    if held is not None:  # the disposition of a deviation that held this run's completion
        deviation_id = held.id
    elif step.id.endswith("__disposition"):  # the inline disposition of this run's failed check
        dev = session.exec(
            select(Deviation)
            .where(Deviation.run_id == ctx.run.id, Deviation.step_id == step.id.removesuffix("__disposition"))
            .order_by(col(Deviation.opened_at).desc())
        ).first()
        deviation_id = dev.id if dev else None
    if not deviation_id or session.get(Deviation, deviation_id) is None:
        log.error("run %s step %s updates_deviation %s: no deviation %r", ctx.run.id, step.id, kind, deviation_id)
        return
    append_deviation_event(
        session,
        deviation_id,
        kind,
        data,
        run_id=ctx.run.id,
        step_id=step.id,
        actor_id=rec.actor_id,
        signature_id=rec.signature_id,
    )
