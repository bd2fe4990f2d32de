"""Stage 3: reading the quality record of a run as one plain structure.

``run_record`` is what ``sopflow record`` prints, what ``--json`` exports and what document
templates render: the same function for all three, so the document and the record cannot differ.
Must not import prefect.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from flows.errors import NotFoundError
from flows.record.corrections import corrections_by_step
from flows.record.deadlines import deadline_states, repetitions
from flows.record.deviations import deviation_state, hold_step_id
from flows.record.evidence import run_evidence
from flows.record.ledger import verify_signature
from flows.record.state import run_status
from flows.record.tables import (
    AuditEvent,
    Deviation,
    Document,
    Escalation,
    RunEvent,
    Signature,
    SopRun,
    StepRecord,
    User,
    iso_utc,
)
from flows.record.versions import stored_sop
from flows.sop.model import HOLDING_CLASSES, HUMAN_KINDS

__all__ = ["disposition_id", "run_record"]


def disposition_id(check_id: str) -> str:
    """The id of the disposition step a failed check opens."""
    return f"{check_id}__disposition"


def _names(session: Session) -> dict[str, str]:
    return {u.id: u.printed_name for u in session.exec(select(User))}


def _usernames(session: Session) -> dict[str, str]:
    return {u.id: u.username for u in session.exec(select(User))}


def run_record(session: Session, run_id: str, *, with_history: bool = True) -> dict[str, Any]:
    """The quality record of one run. Raises NotFoundError when there is no such run."""
    run = session.get(SopRun, run_id)
    if run is None:
        raise NotFoundError(f"no run {run_id!r}; `sopflow runs` lists them")
    sop = stored_sop(session, run)
    names = _names(session)
    usernames = _usernames(session)
    status = run_status(session, run.id)
    records = list(session.exec(select(StepRecord).where(StepRecord.run_id == run.id).order_by(col(StepRecord.n))))
    sigs = {s.id: s for s in session.exec(select(Signature).where(Signature.run_id == run.id))}
    latest: dict[str, StepRecord] = {}
    for r in records:
        latest[r.step_id] = r
    corrections = corrections_by_step(records, sop)

    def signature(sig_id: str | None) -> dict[str, Any] | None:
        sig = sigs.get(sig_id or "")
        if sig is None:
            return None
        return {
            "id": sig.id,
            "user": usernames.get(sig.user_id, sig.user_id),
            "printed_name": sig.printed_name,
            "meaning": sig.meaning,
            "statement": sig.statement,
            "signed_at": iso_utc(sig.signed_at),
            "sha256": sig.signed_sha256,
            "valid": verify_signature(session, sig) is None,
        }

    def step_entry(
        step_id: str, kind: str, title: str | None, fields: dict[str, Any], timeout: Any = None
    ) -> dict[str, Any]:
        rec = latest.get(step_id)
        # The entry's own signature; a correction's signature is shown with the correction.
        signed = [r for r in records if r.step_id == step_id and r.signature_id and r.supersedes_id is None]
        waits = [r for r in records if r.step_id == step_id and r.status == "waiting"]
        return {
            "id": step_id,
            "kind": kind,
            "title": title or step_id,
            "status": rec.status if rec else "not reached",
            "at": iso_utc(rec.at) if rec else None,
            "data": json.loads(rec.data_json) if rec else {},
            "fields": {k: {"label": f.label or k, "unit": f.unit} for k, f in fields.items()},
            "signature": signature(signed[-1].signature_id) if signed else None,
            "corrections": [
                {
                    "record_id": c["record_id"],
                    "supersedes": c["supersedes"],
                    "at": iso_utc(c["at"]),
                    "by": names.get(c["actor_id"], c["actor_id"]),
                    "reason": c["reason"],
                    "changes": c["changes"],
                    "not_rerun": c["not_rerun"],
                    "signature": signature(c["signature_id"]),
                }
                for c in corrections.get(step_id, [])
            ],
            # When a waiting step passes its time-out (``on_timeout`` applies then).
            "due_at": iso_utc(waits[0].at + timeout) if rec and rec.status == "waiting" and waits and timeout else None,
        }

    steps = []
    for step in sop.steps:
        fields = getattr(step, "fields", {}) if step.kind in HUMAN_KINDS else {}
        steps.append(step_entry(step.id, step.kind, step.title, fields, getattr(step, "timeout", None)))
        if getattr(step, "repeat", None) is not None:
            # The step's own entry says how far it is; each repetition <step>#<n> follows as its own entry.
            steps[-1]["repeat"] = repetitions(session, run.id, step, latest)  # type: ignore[arg-type]
            reps = sorted((int(k.partition("#")[2]), k) for k in latest if k.startswith(f"{step.id}#"))
            for n, rep_id in reps:
                steps.append(
                    step_entry(
                        rep_id, step.kind, f"{step.title or step.id} #{n}", fields, getattr(step, "timeout", None)
                    )
                )
        if step.kind == "check" and f"{step.id}__deviation" in latest:  # handled by the deviation SOP (a sub-run)
            steps.append(step_entry(f"{step.id}__deviation", "subrun", f"Deviation at {step.id}: handling sub-run", {}))
        if step.kind == "check" and disposition_id(step.id) in latest:
            steps.append(
                step_entry(disposition_id(step.id), "disposition", f"Disposition of deviation at {step.id}", {})
            )

    run_devs = list(
        session.exec(select(Deviation).where(Deviation.run_id == run.id).order_by(col(Deviation.opened_at)))
    )
    for dev in run_devs:  # a deviation that held the run's completion: its disposition step (issue 15)
        hold = hold_step_id(dev.id)
        if f"{hold}__handling" in latest:
            steps.append(step_entry(f"{hold}__handling", "subrun", f"Deviation {dev.id[:8]}: handling run", {}))
        if hold in latest:
            title = f"Disposition of {dev.classification} deviation {dev.id[:8]} (it held the run's completion)"
            steps.append(step_entry(hold, "disposition", title, {}))

    deadline_ids = {d.id for d in sop.deadlines}
    deviations = [
        {
            "id": d.id,
            "step_id": d.step_id,
            "kind": "deadline" if d.step_id in deadline_ids else "step",
            "classification": d.classification,
            "description": d.description,
            "quarantine": d.quarantine,
            "opened_at": iso_utc(d.opened_at),
            "hold_step": hold_step_id(d.id) if d.classification in HOLDING_CLASSES else None,
            "disposition": latest[disposition_id(d.step_id)].status if disposition_id(d.step_id) in latest else "open",
            "decision": json.loads(latest[disposition_id(d.step_id)].data_json).get("decision")
            if disposition_id(d.step_id) in latest
            else None,
        }
        for d in run_devs
    ]
    for d in deviations:  # the lifecycle (events appended by the deviation SOP's steps, or the inline disposition)
        state = deviation_state(session, session.get(Deviation, d["id"]))  # type: ignore[arg-type]
        d.update(
            {
                "status": state["status"],
                "quarantined": state["quarantined"],
                "capas": state["capas"],
                "lifecycle": state["events"],
                "subruns": state["subruns"],
            }
        )
        if d["decision"] is None and state["decision"] is not None:
            d.update({"disposition": "done", "decision": state["decision"]})
    subruns = [
        {
            "id": r.id,
            "sop_id": r.sop_id,
            "sop_version": r.sop_version,
            "parent_step_id": r.parent_step_id,
            "started_at": iso_utc(r.started_at),
            "status": (st.status if (st := run_status(session, r.id)) else "unknown"),
        }
        for r in session.exec(select(SopRun).where(SopRun.parent_run_id == run.id).order_by(col(SopRun.started_at)))
    ]
    documents = [
        {
            "id": d.id,
            "step_id": d.step_id,
            "template": d.template,
            "path": d.path,
            "sha256": d.sha256,
            "rendered_at": iso_utc(d.rendered_at),
        }
        for d in session.exec(select(Document).where(Document.run_id == run.id).order_by(col(Document.rendered_at)))
    ]
    escalations = [
        {
            "id": e.id,
            "step_id": e.step_id,
            "kind": e.kind,
            "to_role": e.to_role,
            "at": iso_utc(e.at),
            "waiting_since": iso_utc(e.waiting_since),
            "deviation_id": e.deviation_id,
            "deliveries": json.loads(e.deliveries_json),
        }
        for e in session.exec(select(Escalation).where(Escalation.run_id == run.id).order_by(col(Escalation.at)))
    ]
    out: dict[str, Any] = {
        "run": {
            "id": run.id,
            "institution": run.institution,
            "sop_id": run.sop_id,
            "sop_title": sop.title,
            "sop_version": run.sop_version,
            "sop_sha256": run.sop_sha256,
            "schema_version": run.schema_version,
            "params": json.loads(run.params_json),
            "product": json.loads(run.product_json) if run.product_json else None,
            "status": status.status if status else "unknown",
            "status_detail": status.detail if status else None,
            "started_at": iso_utc(run.started_at),
            "started_by": names.get(run.started_by, run.started_by),
            "flow_run_id": run.flow_run_id,
            "parent_run_id": run.parent_run_id,
            "parent_step_id": run.parent_step_id,
        },
        "subruns": subruns,
        "steps": steps,
        "deviations": deviations,
        "documents": documents,
        "escalations": escalations,
        "deadlines": deadline_states(session, run, sop),
    }
    if with_history:
        out["history"] = [
            {
                "id": r.id,
                "n": r.n,
                "step_id": r.step_id,
                "status": r.status,
                "at": iso_utc(r.at),
                "actor": names.get(r.actor_id, r.actor_id) if r.actor_id else "system",
                "data": json.loads(r.data_json),
                "reason": r.reason,
                "supersedes": r.supersedes_id,
                "signature": signature(r.signature_id),
                "task_run_id": r.task_run_id,
            }
            for r in records
        ]
        out["run_events"] = [
            {"id": e.id, "n": e.n, "status": e.status, "detail": e.detail, "at": iso_utc(e.at)}
            for e in session.exec(select(RunEvent).where(RunEvent.run_id == run.id).order_by(col(RunEvent.n)))
        ]
        head = session.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
        out["audit_head"] = {"seq": head.seq, "hash": head.hash} if head else None
        # The rows as stored and the audit events that recorded them: `sopflow audit verify-export`.
        out.update(run_evidence(session, run))
    return out
