"""The service floor: the change-control sweep, a periodic job of the executor (``flows.services.worker``).

``sweep`` (the executor calls it every 5 s; tests pass ``now``): a completed change-control run
turns its version Approved (the event carries QA's signature) and Issued, and assigns training to
every active user holding a role that signs in it, due at the end of the training window; a
rejected one turns it Rejected. An Issued version turns Effective at its effective date and
supersedes the one before, but only once every role that signs in it has the SOP's ``min_trained``
active, trained people (``flows.record.versions.coverage_of``); until then it waits, and QA and the
administrators are told once (``Reminder`` kind ``coverage_wait``). Overdue training and periodic reviews coming due (``REVIEW_NOTICE``
ahead) are notified once each (``Reminder`` rows). Only ``write_session`` writers, via the ledger.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.leases import job_key
from flows.engine.outbox import notify_once
from flows.errors import RecordError
from flows.record import ledger
from flows.record.accounts import is_active
from flows.record.db import init_db, read_session, write_session
from flows.record.state import FINAL_STATUSES, run_status
from flows.record.tables import (
    Reminder,
    Signature,
    SopRun,
    SopVersion,
    SopVersionEvent,
    StepRecord,
    TrainingAssignment,
    iso_utc,
    utcnow,
)
from flows.record.users import current_grants
from flows.record.versions import (
    ADMIN_ROLE,
    activate_due,
    append_version_event,
    due_to_activate,
    event_data,
    state_of,
    version_definition,
    versions_in_state,
)
from flows.services.guard import OFFICER_ROLE as QA_ROLE
from flows.services.training import overdue_training
from flows.services.versions import (
    DEFAULT_REVIEW_MONTHS,
    DEFAULT_TRAINING_DAYS,
    REVIEW_NOTICE,
    add_months,
    signing_roles,
)
from flows.sop.model import SopDefinition

__all__ = ["sweep"]


def _signed(session: Session, run_id: str, step_id: str) -> tuple[dict[str, Any], Signature | None]:
    rec = session.exec(
        select(StepRecord)
        .where(StepRecord.run_id == run_id, StepRecord.step_id == step_id, StepRecord.status == "done")
        .order_by(col(StepRecord.n).desc())
    ).first()
    if rec is None:
        return {}, None
    return json.loads(rec.data_json), session.get(Signature, rec.signature_id) if rec.signature_id else None


def _assign_training(session: Session, version: SopVersion, sop: SopDefinition, due: datetime, now: datetime) -> int:
    roles = signing_roles(sop)
    holders: dict[str, set[str]] = {}
    for g in current_grants(session, institution=version.institution):
        if g.role not in roles:
            continue
        holders.setdefault(g.user_id, set()).add(g.role)
    n = 0
    for user_id, held in sorted(holders.items()):
        if not is_active(session, user_id):
            continue
        ledger.append(
            session,
            TrainingAssignment(
                user_id=user_id,
                version_id=version.id,
                institution=version.institution,
                sop_id=version.sop_id,
                sop_version=version.version,
                roles_json=json.dumps(sorted(held)),
                due_at=due,
                assigned_at=now,
            ),
            actor="system",
            action="training.assign",
        )
        n += 1
    return n


def _conclude(session: Session, version: SopVersion, run: SopRun, status: str, now: datetime) -> str | None:
    """Apply a finished change-control run to its version; returns the new state."""
    if status == "failed":  # the engine failed, nobody decided: the draft may be submitted again
        append_version_event(
            session,
            version,
            "draft",
            actor="system",
            data={"run_id": run.id},
            reason=f"change-control run {run.id} failed ({(run_status_detail(session, run.id) or 'see its record')}); "
            "returned to draft",
            at=now,
        )
        return "returned"
    if status in ("rejected", "stopped"):
        data, sig = _signed(session, run.id, "qa_approval")
        if sig is None:
            data, sig = _signed(session, run.id, "review")
        append_version_event(
            session,
            version,
            "rejected",
            actor=sig.user_id if sig else "system",
            printed_name=sig.printed_name if sig else None,
            meaning="rejected" if sig else None,
            signed_sha256=sig.signed_sha256 if sig else None,
            data={"run_id": run.id, "signature_id": sig.id if sig else None},
            reason=data.get("reason") or f"change-control run {status}",
            at=now,
        )
        return "rejected"
    if status != "completed":
        return None
    data, sig = _signed(session, run.id, "qa_approval")
    _, review = _signed(session, run.id, "review")
    if sig is None:
        raise RecordError(f"change-control run {run.id} completed without a QA approval signature")
    raw_days = data.get("training_days")
    days = float(raw_days) if raw_days is not None else float(DEFAULT_TRAINING_DAYS)
    months = int(data.get("review_months") or DEFAULT_REVIEW_MONTHS)
    training_due = now + timedelta(days=days)
    effective_at = datetime.fromisoformat(data["effective_at"]) if data.get("effective_at") else training_due
    append_version_event(
        session,
        version,
        "approved",
        actor=sig.user_id,
        printed_name=sig.printed_name,
        meaning="approved",
        signed_sha256=sig.signed_sha256,
        data={
            "run_id": run.id,
            "signature_id": sig.id,
            "review_signature_id": review.id if review else None,
            "reviewed_by": review.printed_name if review else None,
        },
        at=now,
    )
    sop = version_definition(version)
    append_version_event(
        session,
        version,
        "issued",
        actor="system",
        at=now,
        data={
            "run_id": run.id,
            "effective_at": iso_utc(effective_at),
            "training_due": iso_utc(training_due),
            "review_due": iso_utc(add_months(effective_at, months)),
        },
    )
    _assign_training(session, version, sop, training_due, now)
    return "issued"


def _to_conclude(session: Session) -> list[tuple[SopVersion, SopVersionEvent, SopRun, str]]:
    """The versions in review whose change-control run has ended (what ``_conclude`` applies), with
    the run and its final status."""
    out = []
    for v, ev in versions_in_state(session, "in_review"):
        run = session.get(SopRun, event_data(ev).get("run_id"))
        status = run_status(session, run.id) if run is not None else None
        if run is not None and status is not None and status.status in FINAL_STATUSES:
            out.append((v, ev, run, status.status))
    return out


def _held(session: Session, waiting: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """(id, institution, sop_id, version) of the versions ``waiting`` for enough trained people."""
    rows = [session.get(SopVersion, vid) for vid in waiting]
    return [(r.id, r.institution, r.sop_id, r.version) for r in rows if r is not None]


def run_status_detail(session: Session, run_id: str) -> str | None:
    ev = run_status(session, run_id)
    return ev.detail if ev is not None else None


def _remind(
    settings: Settings,
    kind: str,
    object_id: str,
    institution: str,
    roles: list[str],
    title: str,
    body: str,
    now: datetime,
) -> bool:
    with read_session(settings.database_url) as s:
        if s.exec(select(Reminder.id).where(Reminder.kind == kind, Reminder.object_id == object_id)).first():
            return False
    # Recorded in the outbox before delivery (once per reminder, even if this sweep dies midway).
    deliveries = notify_once(
        settings,
        key=f"reminder:{kind}:{object_id}",
        institution=institution,
        roles=roles,
        title=title,
        body=body,
        lease=job_key("change_control"),
    )
    try:
        with write_session(settings.database_url) as s:
            if s.exec(select(Reminder.id).where(Reminder.kind == kind, Reminder.object_id == object_id)).first():
                return False
            ledger.append(
                s,
                Reminder(
                    kind=kind, object_id=object_id, deliveries_json=json.dumps(deliveries, sort_keys=True), at=now
                ),
                actor="system",
                action=f"reminder.{kind}",
            )
    except RecordError:  # another executor recorded it first
        return False
    return True


def sweep(settings: Settings, *, now: datetime | None = None) -> dict[str, int]:
    """Conclude finished change-control runs, make due versions Effective, and send overdue-training
    and periodic-review reminders (each once). Returns counts by what happened.

    Raises:
        ConfigError: the notification channels file is broken.
    """
    now = now or utcnow()
    init_db(settings.database_url)
    issued: list[tuple[str, str, str, int, list[str], dict[str, Any]]] = []
    counts = {"issued": 0, "rejected": 0, "returned": 0, "effective": 0, "training_reminders": 0, "review_reminders": 0}
    counts["coverage_waits"] = 0  # versions that wait for enough trained people (each told once)
    # Most sweeps find nothing to conclude or make effective: they ask with reads only and leave the
    # write lock, which every signer's write waits for, alone; the write session asks again under it.
    waiting: dict[str, str] = {}
    with read_session(settings.database_url) as s:
        due = bool(_to_conclude(s)) or bool(due_to_activate(s, now, waiting=waiting))
        held = _held(s, waiting)
    if due:
        with write_session(settings.database_url) as s:
            for v, ev, run, status in _to_conclude(s):
                new = _conclude(s, v, run, status, now)
                if new:
                    counts[new] += 1
                if new == "issued":
                    issued.append(
                        (
                            v.id,
                            v.institution,
                            v.sop_id,
                            v.version,
                            sorted(signing_roles(version_definition(v))),
                            event_data(state_of(s, v.id) or ev),
                        )
                    )
            waiting = {}
            counts["effective"] = len(activate_due(s, now, waiting=waiting))
            held = _held(s, waiting)
    for vid, inst, sop_id, number in held:  # it cannot be signed yet: QA and the administrators are told once
        if _remind(
            settings,
            "coverage_wait",
            vid,
            inst,
            [ADMIN_ROLE, QA_ROLE],
            f"[{sop_id}] v{number} waits to become effective: too few people trained",
            f"{waiting[vid]}. Until then the version before it stays in force. It becomes effective at the first "
            f"sweep after enough people are trained; `sopflow sop versions {sop_id} --institution {inst}` shows "
            "who is trained per role.",
            now,
        ):
            counts["coverage_waits"] += 1
    for vid, inst, sop_id, number, roles, data in issued:  # tell the staff who must train, once
        _remind(
            settings,
            "issued",
            vid,
            inst,
            roles,
            f"[{sop_id}] v{number} issued: training due {data['training_due'][:10]}",
            f"{sop_id} v{number} at {inst} is approved and issued. Everyone holding role {', '.join(roles)} must be "
            f"trained on it by {data['training_due'][:16]} UTC; it becomes effective {data['effective_at'][:16]} UTC, "
            "and from then on only staff trained on it may sign its steps.",
            now,
        )
    for o in overdue_training(settings, now=now):
        roles = sorted({QA_ROLE, *o["roles"]})
        if _remind(
            settings,
            "training_overdue",
            o["assignment_id"],
            o["institution"],
            roles,
            f"[{o['sop_id']}] training overdue: {o['username']} on v{o['sop_version']}",
            f"{o['username']} has not been trained on {o['sop_id']} v{o['sop_version']} at {o['institution']}; "
            f"it was due {o['due_at']:%Y-%m-%d %H:%M} UTC. Until then they may not sign its steps. "
            "`sopflow training overdue` lists every overdue training.",
            now,
        ):
            counts["training_reminders"] += 1
    with read_session(settings.database_url) as s:
        due_reviews = []
        for v, ev in versions_in_state(s, "effective"):
            review_due = event_data(ev).get("review_due")
            if review_due and datetime.fromisoformat(review_due) - REVIEW_NOTICE <= now:
                due_reviews.append((v.id, v.institution, v.sop_id, v.version, review_due))
    for vid, inst, sop_id, number, review_due in due_reviews:
        if _remind(
            settings,
            "review_due",
            f"{vid}@{review_due}",
            inst,
            [ADMIN_ROLE, QA_ROLE],
            f"[{sop_id}] periodic review due {review_due[:10]}",
            f"{sop_id} v{number} at {inst} is due for its periodic review on {review_due[:10]}. Record a review "
            f"that finds no change with `sopflow sop review {sop_id} --institution {inst} --as <QA officer>`, "
            "or draft a new version.",
            now,
        ):
            counts["review_reminders"] += 1
    return counts
