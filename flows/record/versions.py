"""Stage 3: SOP versions and their states (document control, DOMAIN.md section 7).

A ``SopVersion`` row holds one revision's exact text and sha256 and never changes. Its state is
its newest ``SopVersionEvent`` (by position ``n``):

    draft ──submit──▶ in_review ──QA approves──▶ approved ──▶ issued ──effective date──▶ effective
      (change control rejected: rejected)                  (training window)               │
                                                     a newer version turns effective ──▶ superseded
                                                                       withdrawn from use ──▶ retired

``effective`` is also written again, signed, when a periodic review finds no change (``data``:
``periodic_review``, the next ``review_due``). A run starts only on the version that is
``effective`` then (``effective_version``) and stays pinned to it (``SopRun.sop_version_id``).

Which definition a run uses: ``effective_sop`` pins a new run (start and sub-runs alike) to the
version Effective now; ``stored_sop`` reads back the definition a run is pinned to.

``change_control_problem`` is the extra signing rule of the built-in change-control SOP; the one
signing rule, ``state.signer_problem``, calls it for those runs. Must not import prefect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func
from sqlmodel import Session, col, select

from flows.config import Settings
from flows.errors import SopNotEffectiveError, SopNotFoundError, did_you_mean
from flows.record import ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.pinned import stored_sop, version_definition
from flows.record.tables import (
    SopRun,
    SopVersion,
    SopVersionEvent,
    StepRecord,
    User,
    next_position,
    utcnow,
)
from flows.record.training import coverage, coverage_problem
from flows.sop.catalog import INSTITUTION_FILE, PRODUCTS_FILE, Catalog
from flows.sop.model import HOLD_ROLE, HOLDING_CLASSES, CheckStepSpec, HumanStepSpec, SopDefinition

__all__ = [
    "ADMIN_ROLE",
    "CHANGE_CONTROL_ID",
    "REVIEWER_ROLE",
    "STATES",
    "PinnedSop",
    "VersionInfo",
    "activate_due",
    "append_version_event",
    "change_control_problem",
    "coverage_of",
    "due_to_activate",
    "effective_sop",
    "effective_version",
    "event_data",
    "known_sop_ids",
    "newest_effective",
    "signing_roles",
    "state_of",
    "stored_sop",
    "version_definition",
    "versions_in_state",
    "versions_of",
]

CHANGE_CONTROL_ID = "change_control"
"""The id of the built-in change-control SOP (``flows/builtin/change_control.yaml``)."""
ADMIN_ROLE = "sop_admin"
"""The role that makes an institution's SOP administrators: they create drafts and submit changes."""
REVIEWER_ROLE = "sop_reviewer"
"""The role a named reviewer of a change must hold."""

STATES = ("draft", "in_review", "approved", "issued", "effective", "superseded", "retired", "rejected")


def event_data(ev: SopVersionEvent) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ev.data_json)
    return data


def state_of(session: Session, version_id: str) -> SopVersionEvent | None:
    """The version's newest event (its state), or None for a row without events."""
    return session.exec(
        select(SopVersionEvent)
        .where(SopVersionEvent.version_id == version_id)
        .order_by(col(SopVersionEvent.n).desc())
        .limit(1)
    ).first()


def versions_in_state(session: Session, state: str) -> list[tuple[SopVersion, SopVersionEvent]]:
    """Every version whose newest event is ``state``, with that event, oldest version number first:
    one query, however many versions and events the record holds (the sweeps ask every few seconds)."""
    newest = (
        select(col(SopVersionEvent.version_id).label("vid"), func.max(SopVersionEvent.n).label("n"))
        .group_by(col(SopVersionEvent.version_id))
        .subquery()
    )
    rows = session.exec(
        select(SopVersion, SopVersionEvent)
        .join(SopVersionEvent, col(SopVersionEvent.version_id) == col(SopVersion.id))
        .join(newest, and_(newest.c.vid == col(SopVersionEvent.version_id), newest.c.n == col(SopVersionEvent.n)))
        .where(col(SopVersionEvent.state) == state)
        .order_by(col(SopVersion.version), col(SopVersion.id))
    )
    return [(v, ev) for v, ev in rows]


def append_version_event(
    session: Session,
    version: SopVersion,
    state: str,
    *,
    actor: str,
    data: dict[str, Any] | None = None,
    reason: str | None = None,
    printed_name: str | None = None,
    meaning: str | None = None,
    signed_sha256: str | None = None,
    at: datetime | None = None,
) -> SopVersionEvent:
    """Append a state change (inside a write session). With ``meaning`` and no ``signed_sha256``
    it is signed here: the hash covers the version's text hash, the state, the data and the signer."""
    if state not in STATES:
        raise ValueError(f"unknown SOP version state {state!r}")
    at = at or utcnow()
    data = data or {}
    if meaning is not None and signed_sha256 is None:
        signed_sha256 = ledger.sha256_hex(
            ledger.canonical(
                {
                    "version_id": version.id,
                    "sop_sha256": version.sha256,
                    "state": state,
                    "data": data,
                    "signer_id": actor,
                    "printed_name": printed_name,
                    "meaning": meaning,
                    "at": at,
                }
            )
        )
    ev = SopVersionEvent(
        version_id=version.id,
        n=next_position(session, SopVersionEvent.n, SopVersionEvent.version_id, version.id),
        state=state,
        data_json=ledger.canonical(data).decode(),
        actor=actor,
        printed_name=printed_name,
        meaning=meaning,
        signed_sha256=signed_sha256,
        reason=reason,
        at=at,
    )
    ledger.append(session, ev, actor=actor, action=f"sop_version.{state}", reason=reason)
    return ev


@dataclass(frozen=True)
class VersionInfo:
    version: SopVersion
    state: str
    since: datetime
    data: dict[str, Any]
    """The newest event's data (effective_at, review_due, run_id …)."""


def versions_of(session: Session, institution: str, sop_id: str | None = None) -> list[VersionInfo]:
    """Every version (of one SOP) at an institution with its state, by SOP id then version number."""
    query = select(SopVersion).where(SopVersion.institution == institution)
    if sop_id is not None:
        query = query.where(SopVersion.sop_id == sop_id)
    out = []
    for v in session.exec(query.order_by(col(SopVersion.sop_id), col(SopVersion.version), col(SopVersion.stored_at))):
        ev = state_of(session, v.id)
        # A row stored before versions had states (a run used the file): its state is unknown.
        out.append(
            VersionInfo(
                v,
                ev.state if ev else "unknown",
                ev.at if ev else v.stored_at,
                event_data(ev) if ev else {},
            )
        )
    return out


def newest_effective(infos: list[VersionInfo]) -> SopVersion | None:
    """The version in force among ``versions_of`` rows (the newest effective one), or None."""
    effective = [i for i in infos if i.state == "effective"]
    return max(effective, key=lambda i: i.version.version).version if effective else None


def effective_version(session: Session, institution: str, sop_id: str) -> SopVersion | None:
    """The version in force now (the newest effective one), or None."""
    return newest_effective(versions_of(session, institution, sop_id))


def signing_roles(sop: SopDefinition) -> set[str]:
    """Every role that signs a step of the SOP (a failed check's disposition role too, and QA when a
    deadline or a time-out may open a deviation that holds the run until QA signs its disposition)."""
    roles = {s.role for s in sop.steps if isinstance(s, HumanStepSpec)}
    roles |= {
        s.deviation.disposition_role for s in sop.steps if isinstance(s, CheckStepSpec) and s.on_fail == "deviation"
    }
    holds = any(d.deviation.classification in HOLDING_CLASSES for d in sop.deadlines) or any(
        isinstance(s, HumanStepSpec)
        and s.on_timeout == "deviation"
        and s.timeout_deviation.classification in HOLDING_CLASSES
        for s in sop.steps
    )
    return roles | {HOLD_ROLE} if holds else roles


def coverage_of(session: Session, version: SopVersion) -> tuple[list[dict[str, Any]], str | None]:
    """Who may sign the version, per role that signs in it (``flows.record.training.coverage``
    against the SOP's ``min_trained``), and why it may not turn Effective yet (None: it may)."""
    sop = version_definition(version)
    rows = coverage(session, version.institution, version.sop_id, version.version, signing_roles(sop), sop.min_trained)
    return rows, coverage_problem(rows, version.sop_id, version.version)


def due_to_activate(
    session: Session,
    now: datetime,
    *,
    institution: str | None = None,
    sop_id: str | None = None,
    waiting: dict[str, str] | None = None,
) -> list[tuple[SopVersion, dict[str, Any]]]:
    """The issued versions ``activate_due`` turns effective now, each with its issued event's data
    (reads only: a sweep asks first and takes the write lock only when there is one). A version
    whose effective date has come without enough trained people goes to ``waiting`` instead."""
    ready = []
    for v, ev in versions_in_state(session, "issued"):
        if (institution is not None and v.institution != institution) or (sop_id is not None and v.sop_id != sop_id):
            continue
        data = event_data(ev)
        if datetime.fromisoformat(data["effective_at"]) > now:
            continue
        _, problem = coverage_of(session, v)
        if problem is not None:
            if waiting is not None:
                waiting[v.id] = problem
            continue
        ready.append((v, data))
    return ready


def activate_due(
    session: Session,
    now: datetime | None = None,
    *,
    institution: str | None = None,
    sop_id: str | None = None,
    waiting: dict[str, str] | None = None,
) -> list[SopVersion]:
    """Turn every issued version whose effective date has come effective, superseding the one
    before it (inside a write session). Returns the versions that turned effective.

    A version turns Effective only when every role that signs in it has at least the SOP's
    ``min_trained`` active people trained on it (``coverage_of``); until then it stays Issued, the
    version before it stays in force, and ``waiting`` (when given) gets its id -> the reason."""
    now = now or utcnow()
    done = []
    for v, data in due_to_activate(session, now, institution=institution, sop_id=sop_id, waiting=waiting):
        for other in versions_of(session, v.institution, v.sop_id):
            if other.state == "effective" and other.version.id != v.id:
                append_version_event(
                    session,
                    other.version,
                    "superseded",
                    actor="system",
                    data={"by_version": v.version},
                    reason=f"v{v.version} became effective",
                    at=now,
                )
        append_version_event(
            session,
            v,
            "effective",
            actor="system",
            data={"effective_at": data["effective_at"], "review_due": data.get("review_due")},
            at=now,
        )
        done.append(v)
    return done


def _author(session: Session, run: SopRun) -> str | None:
    """The user id of the author of the version a change-control run is about (who created the draft)."""
    params = json.loads(run.params_json)
    version = session.exec(
        select(SopVersion).where(
            SopVersion.institution == run.institution,
            SopVersion.sop_id == params.get("sop_id"),
            SopVersion.version == int(params.get("version") or 0),
        )
    ).first()
    if version is None:
        return None
    first = session.exec(
        select(SopVersionEvent)
        .where(SopVersionEvent.version_id == version.id)
        .order_by(col(SopVersionEvent.n))
        .limit(1)
    ).first()
    return first.actor if first is not None else None


def change_control_problem(session: Session, run: SopRun, step_id: str, user_id: str) -> str | None:
    """The change-control SOP's own signing rules: the author (who created the draft, or signed
    its submission) never reviews or approves the change; the review is signed by the named reviewer."""
    if step_id == "submit":
        return None
    params = json.loads(run.params_json)
    authors = {_author(session, run)}
    authors |= {
        r.actor_id
        for r in session.exec(
            select(StepRecord).where(
                StepRecord.run_id == run.id, StepRecord.step_id == "submit", col(StepRecord.signature_id).is_not(None)
            )
        )
    }
    if user_id in authors:
        what = "approve" if step_id == "qa_approval" else "review"
        return (
            f"the author of a change may not {what} it: {params.get('sop_id')} v{params.get('version')} was "
            "written or submitted by you (separation of duties)"
        )
    if step_id == "review":
        user = session.get(User, user_id)
        if user is None or user.username != params.get("reviewer"):
            return f"step 'review' of this change may only be signed by its named reviewer {params.get('reviewer')!r}"
    return None


# -- which definition a run uses ---------------------------------------------------------------
@dataclass(frozen=True)
class PinnedSop:
    """The version a run starts on: its row id, definition and text hash."""

    version_id: str
    definition: SopDefinition
    sha256: str


def known_sop_ids(settings: Settings, session: Session, institution: str) -> set[str]:
    """The SOP ids an institution has: those with a stored version, and the files in its folder."""
    ids = {v.sop_id for v in session.exec(select(SopVersion).where(SopVersion.institution == institution))}
    folder = settings.sops_dir / institution
    if folder.is_dir():
        ids |= {p.stem for p in folder.glob("*.yaml") if p.name not in (INSTITUTION_FILE, PRODUCTS_FILE)}
    return ids


def effective_sop(settings: Settings, institution: str, sop_id: str, *, now: datetime | None = None) -> PinnedSop:
    """The version of ``sop_id`` Effective now (an Issued one whose date has come turns Effective first).

    Raises:
        SopNotFoundError: no such institution or SOP. SopNotEffectiveError: no version is Effective.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        infos = versions_of(s, institution, sop_id)
        due = any(
            i.state == "issued" and datetime.fromisoformat(i.data["effective_at"]) <= (now or utcnow()) for i in infos
        )
        if not due and (version := newest_effective(infos)) is not None:
            return PinnedSop(version.id, version_definition(version), version.sha256)
    if due:
        with write_session(settings.database_url) as s:
            activate_due(s, now, institution=institution, sop_id=sop_id)
    with read_session(settings.database_url) as s:
        infos = versions_of(s, institution, sop_id)
        if (version := newest_effective(infos)) is not None:
            return PinnedSop(version.id, version_definition(version), version.sha256)
        known = known_sop_ids(settings, s, institution)
        waits = {i.version.id: coverage_of(s, i.version)[1] for i in infos if i.state == "issued"}
        institutions = set(Catalog(settings.sops_dir, settings.templates_dir).institutions()) | set(
            s.exec(select(SopVersion.institution))
        )
    if institution not in institutions:
        raise SopNotFoundError(
            f"no institution {institution!r}. {did_you_mean(institution, sorted(institutions), 'Known institutions')}".rstrip()
        )
    if sop_id not in known:
        hint = did_you_mean(sop_id, sorted(known), "Known SOPs") or "Known SOPs: none."
        raise SopNotFoundError(f"no SOP {sop_id!r} in {institution}. {hint}")
    why = "a run starts only on a version that has been reviewed, approved by QA and trained on"
    if not infos:
        raise SopNotEffectiveError(
            f"{institution}/{sop_id} has no Effective version, so no run may start: {why}. The file "
            f"sops/{institution}/{sop_id}.yaml has not been through change control: an installation's first versions "
            f"are established with `sopflow sop establish {institution} --as <QA officer>`, later ones with "
            "`sopflow sop draft` and `sopflow sop submit`"
        )
    states = "; ".join(
        f"v{i.version.version} is {i.state.replace('_', ' ')}"
        + (f" (effective from {i.data['effective_at'][:16]} UTC)" if i.state == "issued" else "")
        + (f"; it waits: {waits[i.version.id]}" if waits.get(i.version.id) else "")
        for i in infos
    )
    raise SopNotEffectiveError(f"{institution}/{sop_id} has no Effective version, so no run may start: {why}. {states}")
