"""The service floor: training records (21 CFR 11.10(i)): who is trained on which SOP version.

Who may (``flows.services.guard``): only a QA officer of the institution records training
(``officer``, re-authenticated, role ``qa`` there); anyone else, or nobody, is refused and the
refusal audited. Only people trained on a run's exact SOP version may sign its steps
(``flows.record.state.signer_problem``). ``overdue_training`` lists training assigned when a
version was issued (change control) and not recorded by its due date; ``coverage_rows`` how many
active, trained people each role that signs in an Issued or Effective version has against the SOP's
``min_trained`` (an Issued version waits for it before it turns Effective).
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.errors import FlowsError, RecordError, SopDefinitionError, SopNotFoundError, did_you_mean
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import SopVersion, TrainingAssignment, User, utcnow
from flows.record.training import is_trained, record_training, training_records
from flows.record.versions import coverage_of, known_sop_ids, state_of
from flows.services import guard
from flows.services.guard import Officer
from flows.sop.catalog import INSTITUTION_FILE, Catalog
from flows.sop.load import load_institution_file

__all__ = ["coverage_rows", "grant_training", "list_training", "overdue_training"]


def _check_sop_version(settings: Settings, session: Session, institution: str, sop_id: str, version: int) -> None:
    """The SOP revision must exist: in ``sops/`` now, or stored (a version of change control)."""
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    stored = list(session.exec(select(SopVersion.institution, SopVersion.sop_id, SopVersion.version)))
    institutions = set(catalog.institutions()) | {r[0] for r in stored}
    if institution not in institutions:
        hint = did_you_mean(institution, sorted(institutions), "Known institutions") or "There are no institutions."
        raise SopNotFoundError(f"no institution {institution!r}. {hint}")
    ids = known_sop_ids(settings, session, institution)
    if sop_id not in ids:
        hint = did_you_mean(sop_id, sorted(ids), "Known SOPs") or "There are no SOPs."
        raise SopNotFoundError(f"no SOP {sop_id!r} in {institution}. {hint}")
    versions = {r[2] for r in stored if r[0] == institution and r[1] == sop_id}
    if (settings.sops_dir / institution / f"{sop_id}.yaml").is_file():
        with contextlib.suppress(SopDefinitionError):  # a broken file: only the stored revisions count
            versions.add(catalog.get_sop(institution, sop_id).definition.version)
    if version not in versions:
        known = ", ".join(str(v) for v in sorted(versions)) or "none"
        raise SopNotFoundError(f"{institution}/{sop_id} has no version {version}; known versions: {known}")


def _trained_at(settings: Settings, institution: str, raw: str | None) -> datetime:
    """``--date``: an ISO date (midnight in the institution's zone) or date-time with an offset; not in the future."""
    now = utcnow()
    if raw is None:
        return now
    try:
        if len(raw) == 10:
            try:
                zone = ZoneInfo(load_institution_file(settings.sops_dir / institution / INSTITUTION_FILE).timezone)
            except (FlowsError, OSError):  # no or broken institution file: UTC
                zone = ZoneInfo("UTC")
            when = datetime.combine(date.fromisoformat(raw), time(0), tzinfo=zone)
        else:
            when = datetime.fromisoformat(raw)
    except ValueError:
        raise RecordError(
            f"training date {raw!r}: expected an ISO date (2026-11-01) or date-time with an offset"
        ) from None
    if when.tzinfo is None:
        raise RecordError(f"training date {raw!r}: a date-time needs an offset (e.g. +08:00)")
    if when > now:
        raise RecordError(f"training date {raw!r} is in the future; record training once it has taken place")
    return when.astimezone(UTC)


def grant_training(
    settings: Settings,
    username: str,
    institution: str,
    sop_id: str,
    version: int,
    *,
    officer: Officer | None,
    trainer: str | None = None,
    trained_on: str | None = None,
) -> str:
    """Record that ``username`` is trained on ``sop_id`` v``version`` at ``institution``, by a QA
    officer of that institution; returns the record's id. The trainer defaults to the officer.

    Raises:
        NotAuthorizedError (no officer, or not ``qa`` there: audited), AuthenticationError,
        SopNotFoundError (unknown institution, SOP or version, with "did you mean"), NotFoundError, RecordError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:  # what is asked exists, before anyone signs in
        guard.target_user(s, username)
        _check_sop_version(settings, s, institution, sop_id, version)
    when = _trained_at(settings, institution, trained_on)
    actor = guard.require_officer(
        settings,
        officer,
        {institution},
        action="training.grant",
        target=username,
        purpose="record training",
        nobody="training is recorded by a QA officer of the institution: --as QA_USER",
    )
    who = (trainer or "").strip() or actor.printed_name
    with write_session(settings.database_url) as s:
        user = guard.target_user(s, username)
        rec = record_training(s, user, institution, sop_id, version, trained_at=when, trainer=who, actor=actor.id)
        return rec.id


def list_training(settings: Settings, username: str | None = None) -> list[dict[str, Any]]:
    """Training records (of one user), oldest entry first.

    Raises:
        NotFoundError: no such user.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        names = {u.id: u.username for u in s.exec(select(User))}
        user_id = guard.target_user(s, username).id if username else None
        return [
            {
                "username": names.get(r.user_id, r.user_id),
                "institution": r.institution,
                "sop_id": r.sop_id,
                "sop_version": r.sop_version,
                "trained_at": r.trained_at,
                "trainer": r.trainer,
                "recorded_by": names.get(r.recorded_by, r.recorded_by),
                "recorded_at": r.recorded_at,
            }
            for r in training_records(s, user_id)
        ]


def overdue_training(
    settings: Settings, *, now: datetime | None = None, institution: str | None = None
) -> list[dict[str, Any]]:
    """Training assigned on issued versions, due and not yet recorded, oldest due first."""
    now = now or utcnow()
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        names = {u.id: u.username for u in s.exec(select(User))}
        query = select(TrainingAssignment).order_by(col(TrainingAssignment.due_at))
        if institution is not None:
            query = query.where(TrainingAssignment.institution == institution)
        for a in s.exec(query):
            if a.due_at > now or is_trained(s, a.user_id, a.institution, a.sop_id, a.sop_version):
                continue
            ev = state_of(s, a.version_id)
            if ev is not None and ev.state in ("superseded", "retired"):
                continue
            out.append(
                {
                    "assignment_id": a.id,
                    "username": names.get(a.user_id, a.user_id),
                    "institution": a.institution,
                    "sop_id": a.sop_id,
                    "sop_version": a.sop_version,
                    "roles": json.loads(a.roles_json),
                    "due_at": a.due_at,
                    "overdue_days": (now - a.due_at).days,
                }
            )
    return out


def coverage_rows(settings: Settings, institution: str | None = None) -> list[dict[str, Any]]:
    """Per Issued or Effective version and role that signs in it: ``trained`` (active people holding
    the role there, trained on that version) against ``needed`` (the SOP's ``min_trained``);
    ``waiting`` is the reason an Issued version may not turn Effective (at its date or after) yet."""
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        query = select(SopVersion).order_by(
            col(SopVersion.institution), col(SopVersion.sop_id), col(SopVersion.version)
        )
        if institution is not None:
            query = query.where(SopVersion.institution == institution)
        for v in s.exec(query):
            ev = state_of(s, v.id)
            if ev is None or ev.state not in ("issued", "effective"):
                continue
            rows, problem = coverage_of(s, v)
            for r in rows:
                out.append(
                    {
                        "institution": v.institution,
                        "sop_id": v.sop_id,
                        "sop_version": v.version,
                        "state": ev.state,
                        "role": r["role"],
                        "trained": r["trained"],
                        "needed": r["needed"],
                        "short": r["short"],
                        "waiting": problem if ev.state == "issued" else None,
                    }
                )
    return out
