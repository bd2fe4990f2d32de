"""Stage 3: reading the current state out of the append-only record, and who may sign what.

The state of a step is its newest ``StepRecord``; the state of a run is its newest ``RunEvent``.
``signer_problem`` is the one rule for who may sign a human step; the submit path and the flow's
gate both call it, so the rule is checked twice with the same code. Must not import prefect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlmodel import Session, col, select

from flows.record.accounts import is_active
from flows.record.current import FINAL_STATUSES
from flows.record.tables import (
    AuditEvent,
    CurrentStep,
    RunEvent,
    Signature,
    SopRun,
    StepRecord,
    User,
    next_position,
    utcnow,
)
from flows.record.training import grant_hint, is_trained
from flows.record.users import roles_of
from flows.record.versions import CHANGE_CONTROL_ID, change_control_problem
from flows.sop.model import HumanStepSpec, SopDefinition, VerifyStepSpec

__all__ = [
    "FINAL_STATUSES",
    "next_n",
    "refused_count",
    "run_status",
    "signed_but_suspended",
    "signer_problem",
    "signers_by_run",
    "step_data",
    "step_states",
]


def step_states(session: Session, run_id: str) -> dict[str, StepRecord]:
    """The newest record of each step of a run."""
    rows = session.exec(select(StepRecord).where(StepRecord.run_id == run_id).order_by(col(StepRecord.n)))
    latest: dict[str, StepRecord] = {}
    for r in rows:
        latest[r.step_id] = r
    return latest


def next_n(session: Session, table: type[StepRecord] | type[RunEvent], run_id: str) -> int:
    """The next position in a run's sequence (call inside a write session: it holds the lock)."""
    return next_position(session, table.n, table.run_id, run_id)


def step_data(rec: StepRecord) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(rec.data_json)
    return data


STALE_RESUME = "resume.stale"
"""Audit action: a resume carried the signature of another, already accepted step of the run."""


def refused_count(session: Session, run_id: str, step_id: str) -> int:
    """How many resumes of this step were refused or stale: the gate's next pause key counts them,
    because Prefect hands a key's input out again on every suspend with that key."""
    rows = session.exec(
        select(StepRecord.id).where(
            StepRecord.run_id == run_id, StepRecord.step_id == step_id, StepRecord.status == "refused"
        )
    )
    stale = session.exec(
        select(AuditEvent.seq).where(AuditEvent.action == STALE_RESUME, AuditEvent.object_id == f"{run_id}/{step_id}")
    )
    return len(list(rows)) + len(list(stale))


def run_status(session: Session, run_id: str) -> RunEvent | None:
    return session.exec(
        select(RunEvent).where(RunEvent.run_id == run_id).order_by(col(RunEvent.n).desc()).limit(1)
    ).first()


def _signers_of(
    session: Session, run_id: str, step_ids: set[str], facts: dict[tuple[str, ...], Any] | None = None
) -> list[tuple[str, str]]:
    """(step_id, user_id) of every signature on these steps, a corrected one's too, in a fixed order
    (from ``facts[("signers", run_id)]`` when the caller read them already: ``signers_by_run``)."""
    known = facts.get(("signers", run_id)) if facts is not None else None
    if known is not None:
        return [(step_id, user_id) for step_id, user_id in known if step_id in step_ids]
    sigs = session.exec(
        select(Signature)
        .where(Signature.run_id == run_id, col(Signature.step_id).in_(step_ids))
        .order_by(col(Signature.step_id), col(Signature.id))
    )
    return [(s.step_id, s.user_id) for s in sigs]


def signers_by_run(session: Session, run_ids: list[str], facts: dict[tuple[str, ...], Any]) -> None:
    """Read the signers of every step of these runs at once into ``facts`` (for ``signer_problem``)."""
    for run_id in run_ids:
        facts[("signers", run_id)] = []
    if not run_ids:
        return
    sigs = session.exec(
        select(Signature)
        .where(col(Signature.run_id).in_(run_ids))
        .order_by(col(Signature.run_id), col(Signature.step_id), col(Signature.id))
    )
    for sig in sigs:
        facts[("signers", sig.run_id)].append((sig.step_id, sig.user_id))


def _known(facts: dict[tuple[str, ...], Any] | None, key: tuple[str, ...], work: Callable[[], Any]) -> Any:
    """``work()``, remembered in ``facts`` under ``key`` when the caller keeps facts (one read of many steps)."""
    if facts is None:
        return work()
    if key not in facts:
        facts[key] = work()
    return facts[key]


def signer_problem(
    session: Session,
    run: SopRun,
    sop: SopDefinition,
    step: HumanStepSpec,
    user_id: str,
    *,
    facts: dict[tuple[str, ...], Any] | None = None,
) -> str | None:
    """Why ``user_id`` may not sign ``step`` of ``run``, or None when they may.

    The rules, in this order: the account is not disabled (a signature made before it was
    disabled is refused too, when the flow re-checks it); the step's role at the run's institution; training on the run's
    SOP id and version there (a failed check's disposition step is part of the SOP: same rule);
    in a change-control run, the author neither reviews nor approves, and only the named reviewer reviews;
    a verifier is not the performer; the SOP's ``distinct_signers`` groups.

    ``facts``: a dict the caller keeps across the steps of one read (the inbox asks for many), so
    the account's state, roles and training are read once each, not once per step.
    """
    if not _known(facts, ("active", user_id), lambda: is_active(session, user_id)):
        user = session.get(User, user_id)
        return f"the account {user.username if user else user_id!r} is disabled"
    if step.role not in _known(
        facts, ("roles", user_id, run.institution), lambda: roles_of(session, user_id, run.institution)
    ):
        return f"step {step.id!r} may only be signed by role {step.role!r} of {run.institution!r}"
    if run.sop_id == CHANGE_CONTROL_ID and (problem := change_control_problem(session, run, step.id, user_id)):
        return problem  # the built-in change-control SOP's rules (flows.record.versions)
    trained = _known(
        facts,
        ("trained", user_id, run.institution, run.sop_id, str(run.sop_version)),
        lambda: is_trained(session, user_id, run.institution, run.sop_id, run.sop_version),
    )
    if not trained:
        user = session.get(User, user_id)
        name = user.username if user else user_id
        return (
            f"only staff trained on {run.sop_id} v{run.sop_version} at {run.institution!r} may sign step {step.id!r}; "
            f"user {name!r} is not trained on {run.sop_id} v{run.sop_version} "
            f"({grant_hint(name, run.institution, run.sop_id, run.sop_version)})"
        )
    # Everyone who signed the verified step's entry, a corrector too, performed it.
    if isinstance(step, VerifyStepSpec) and user_id in {u for _, u in _signers_of(session, run.id, {step.of}, facts)}:
        return f"step {step.id!r} verifies step {step.of!r}: the person who performed {step.of!r} may not verify it"
    for group in sop.distinct_signers:
        if step.id not in group:
            continue
        others = set(group) - {step.id}
        for other, signer in _signers_of(session, run.id, others, facts):
            if signer == user_id:
                return (
                    f"steps {', '.join(repr(g) for g in group)} must be signed by different people; "
                    f"you signed {other!r} already"
                )
    return None


def signed_but_suspended(session: Session, older_than: float = 0.0) -> list[tuple[str, str, str]]:
    """(flow_run_id, step_id, signature_id) of every step whose newest record is ``signed`` and
    older than ``older_than`` seconds: the flow has not accepted it (its resume may be lost)."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    # The steps whose newest record is ``signed`` now (the current-state index), never every record.
    rows = session.exec(
        select(StepRecord, SopRun)
        .join(CurrentStep, col(CurrentStep.record_id) == col(StepRecord.id))
        .join(SopRun, col(SopRun.id) == col(StepRecord.run_id))
        .where(CurrentStep.status == "signed", col(CurrentStep.at) <= cutoff)
        .order_by(col(StepRecord.run_id), col(StepRecord.n))
    )
    return [(run.flow_run_id, rec.step_id, rec.signature_id) for rec, run in rows if rec.signature_id]
