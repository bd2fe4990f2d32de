"""The service floor: training status and the people of an institution (issue 14).

    training_status  mine: each Effective or Issued SOP version one of my roles signs, and whether
                     I am trained on it, due (with the date), overdue or not trained; my team's, the
                     same for everyone at the institutions where I am a QA officer; and overdue
                     training there
    people           for QA officers: the users holding roles at their institutions, with roles,
                     account state and what the add-user and record-training forms offer

Reads only: adding users and recording training stay ``accounts.add_user`` and
``training.grant_training``, with their rules in ``flows.services.guard``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import NotAuthorizedError
from flows.record import accounts as account_rows
from flows.record.db import init_db, read_session
from flows.record.tables import RoleGrant, TrainingAssignment, TrainingRecord, User, utcnow
from flows.record.versions import version_definition, versions_of
from flows.services import guard
from flows.services.training import overdue_training
from flows.services.versions import signing_roles
from flows.services.wording import role_labels
from flows.sop.model import text_in

__all__ = ["change_control_people", "people", "training_status"]

_LIVE = ("effective", "issued")


def _rows_for(session: Any, user: User, institution: str, now: datetime, language: str | None) -> list[dict[str, Any]]:
    held = {
        g.role
        for g in session.exec(
            select(RoleGrant).where(RoleGrant.user_id == user.id, RoleGrant.institution == institution)
        )
    }
    out = []
    for info in versions_of(session, institution):
        if info.state not in _LIVE:
            continue
        sop = version_definition(info.version)
        needs = sorted(signing_roles(sop) & held)
        if not needs:
            continue
        record = session.exec(
            select(TrainingRecord)
            .where(
                TrainingRecord.user_id == user.id,
                TrainingRecord.institution == institution,
                TrainingRecord.sop_id == sop.id,
                TrainingRecord.sop_version == sop.version,
            )
            .order_by(col(TrainingRecord.trained_at).desc())
        ).first()
        assigned = session.exec(
            select(TrainingAssignment).where(
                TrainingAssignment.user_id == user.id, TrainingAssignment.version_id == info.version.id
            )
        ).first()
        if record is not None:
            status = "trained"
        elif assigned is not None:
            status = "overdue" if assigned.due_at < now else "due"
        else:
            status = "not_trained"
        out.append(
            {
                "username": user.username,
                "printed_name": user.printed_name,
                "institution": institution,
                "sop_id": sop.id,
                "version": sop.version,
                "title": text_in(sop.title, language),
                "state": info.state,
                "roles": needs,
                "status": status,
                "due_at": assigned.due_at if assigned is not None else None,
                "trained_at": record.trained_at if record is not None else None,
                "trainer": record.trainer if record is not None else None,
            }
        )
    return sorted(
        out, key=lambda r: ({"overdue": 0, "not_trained": 1, "due": 2, "trained": 3}[r["status"]], r["sop_id"])
    )


def training_status(
    settings: Settings, username: str, *, now: datetime | None = None, language: str | None = None
) -> dict[str, Any]:
    """``{"mine": rows, "team": {institution: {user: rows}}, "overdue": [...], "officer_of": [...]}``.

    Raises:
        NotFoundError: no such user.
    """
    now = now or utcnow()
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        me = guard.target_user(s, username)
        mine_at = sorted(guard.institutions_of(s, me.id))
        officer_of = sorted(guard.institutions_of(s, me.id, guard.OFFICER_ROLE))
        mine = [row for inst in mine_at for row in _rows_for(s, me, inst, now, language)]
        team: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for inst in officer_of:
            ids = sorted(set(s.exec(select(RoleGrant.user_id).where(RoleGrant.institution == inst))))
            for uid in ids:
                user = s.get(User, uid)
                if user is None or not account_rows.is_active(s, uid):
                    continue
                rows = _rows_for(s, user, inst, now, language)
                if rows:
                    team.setdefault(inst, {})[user.username] = rows
    overdue = [
        t for t in overdue_training(settings, now=now) if t["institution"] in officer_of or t["username"] == username
    ]
    return {"mine": mine, "team": team, "overdue": overdue, "officer_of": officer_of}


def people(settings: Settings, username: str, language: str | None = None) -> dict[str, Any]:
    """For a QA officer: every user holding a role at the institutions where they are QA, with roles
    (labels), account state and training counts, and the institutions' roles and live SOP versions
    for the add-user and record-training forms.

    Raises:
        NotFoundError (no such user), NotAuthorizedError (not a QA officer anywhere)
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        me = guard.target_user(s, username)
        officer_of = sorted(guard.institutions_of(s, me.id, guard.OFFICER_ROLE))
        if not officer_of:
            raise NotAuthorizedError(
                f"user {username!r} may not manage users at no institution: that takes role "
                f"{guard.OFFICER_ROLE!r} there"
            )
        institutions: dict[str, dict[str, Any]] = {}
        for inst in officer_of:
            labels = role_labels(settings, inst, language)
            users = []
            for uid in sorted(set(s.exec(select(RoleGrant.user_id).where(RoleGrant.institution == inst)))):
                user = s.get(User, uid)
                if user is None:
                    continue
                roles = sorted(
                    s.exec(select(RoleGrant.role).where(RoleGrant.user_id == uid, RoleGrant.institution == inst))
                )
                trained = len(
                    list(
                        s.exec(
                            select(TrainingRecord.id).where(
                                TrainingRecord.user_id == uid, TrainingRecord.institution == inst
                            )
                        )
                    )
                )
                users.append(
                    {
                        "username": user.username,
                        "printed_name": user.printed_name,
                        "roles": [{"id": r, "label": labels.get(r, r)} for r in roles],
                        "active": account_rows.is_active(s, uid),
                        "locked": account_rows.is_locked(s, uid),
                        "trainings": trained,
                    }
                )
            live = [
                {"sop_id": i.version.sop_id, "version": i.version.version, "state": i.state}
                for i in versions_of(s, inst)
                if i.state in _LIVE
            ]
            institutions[inst] = {
                "users": sorted(users, key=lambda u: u["username"]),
                "roles": [{"id": r, "label": label} for r, label in labels.items()],
                "versions": sorted(live, key=lambda v: (v["sop_id"], v["version"])),
            }
    return {"officer_of": officer_of, "institutions": institutions}


def change_control_people(settings: Settings, institution: str, username: str) -> dict[str, Any]:
    """For an SOP's page: who may be named reviewer (role ``sop_reviewer`` there, not the reader),
    and whether the reader may act as SOP administrator or QA there."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        me = guard.target_user(s, username)
        held = {
            g.role
            for g in s.exec(select(RoleGrant).where(RoleGrant.user_id == me.id, RoleGrant.institution == institution))
        }
        reviewers = []
        for g in s.exec(
            select(RoleGrant).where(RoleGrant.institution == institution, RoleGrant.role == "sop_reviewer")
        ):
            user = s.get(User, g.user_id)
            if user is not None and user.id != me.id and account_rows.is_active(s, user.id):
                reviewers.append({"username": user.username, "printed_name": user.printed_name})
    return {
        "reviewers": sorted(reviewers, key=lambda r: r["username"]),
        "admin": guard.ADMIN_ROLE in held,
        "qa": guard.OFFICER_ROLE in held,
    }
