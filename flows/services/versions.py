"""The service floor: SOP versions: establish the first ones, periodic review, retire, list.
New versions come through change control (``flows.services.drafts``: draft, submit).

Version states live in ``flows.record.versions`` (and which version a run uses:
``effective_sop``); the sweep that issues, activates and reminds is ``flows.services.sweeps``;
the editor's helpers ``flows.services.editor``; export and import ``flows.services.transfer``.

The rules, and who may do what (asked of ``flows.services.guard``):

- ``establish``: an installation's first versions. The files in ``sops/<institution>/`` become
  Effective versions in one transaction, each signed by a QA officer of the institution
  (re-authenticated) with the meaning ``initial issue``; refused once the institution has any
  version. The built-in change-control SOP (``flows/builtin/change_control.yaml``) is
  established with them; it needs the roles ``sop_admin``, ``sop_reviewer`` and ``qa`` (without
  them it is skipped, said so, and change control is refused until they exist).
- ``create_draft``: an administrator of the institution (role ``sop_admin`` there) stores YAML
  text, validated as ``sopflow sop validate`` does, as a Draft. Version numbers are never reused:
  a draft's ``version`` must exceed every version of that SOP, whatever became of it.
- ``submit_change``: an administrator starts the built-in change-control SOP on a Draft (it
  turns In review) and signs its first step with the reason for change; the named reviewer and
  QA sign the rest through the normal path (``sopflow submit``). The author never reviews or
  approves (``flows.record.versions.change_control_problem``).
- ``flows.services.sweeps.sweep`` (a periodic job of the executor) issues approved versions,
  assigns training, makes due versions Effective and sends reminders.
- ``record_review`` (periodic review, no change) and ``retire``: a QA officer, signed.

The CLI (``flows.cli.changes``) and the web app call these; they raise, the edges format.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.errors import ChangeControlError, RecordError, SopNotFoundError
from flows.record import ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import SopVersion, SopVersionEvent, User, iso_utc, utcnow
from flows.record.versions import (
    ADMIN_ROLE,
    CHANGE_CONTROL_ID,
    REVIEWER_ROLE,
    append_version_event,
    coverage_of,
    effective_sop,
    event_data,
    signing_roles,
    state_of,
    versions_of,
)
from flows.services import guard
from flows.services.guard import OFFICER_ROLE as QA_ROLE
from flows.services.guard import Officer
from flows.sop.catalog import INSTITUTION_FILE, Catalog
from flows.sop.editing import load_sop_text
from flows.sop.load import load_institution_file
from flows.sop.model import SopDefinition

__all__ = [
    "BUILTIN_SOP",
    "CHANGE_CONTROL_ID",
    "DEFAULT_REVIEW_MONTHS",
    "DEFAULT_TRAINING_DAYS",
    "REVIEW_NOTICE",
    "add_months",
    "builtin_sop",
    "establish",
    "find_version",
    "list_versions",
    "record_review",
    "retire",
    "signing_roles",
    "store_version",
]

BUILTIN_SOP = Path(__file__).resolve().parent.parent / "builtin" / "change_control.yaml"
DEFAULT_TRAINING_DAYS = 14
DEFAULT_REVIEW_MONTHS = 24
REVIEW_NOTICE = timedelta(days=30)
"""How long before a periodic review is due the administrators and QA are reminded."""


def add_months(when: datetime, months: int) -> datetime:
    """``when`` plus whole calendar months (the day clamped to the month's length)."""
    month0 = when.month - 1 + months
    year, month = when.year + month0 // 12, month0 % 12 + 1
    return when.replace(year=year, month=month, day=min(when.day, calendar.monthrange(year, month)[1]))


def builtin_sop(settings: Settings, institution: str) -> tuple[str, str, SopDefinition]:
    """The built-in change-control SOP's text, sha256 and definition, checked against the institution's roles."""
    text = BUILTIN_SOP.read_text(encoding="utf-8")
    spec = load_institution_file(settings.sops_dir / institution / INSTITUTION_FILE)
    missing = sorted({ADMIN_ROLE, REVIEWER_ROLE, QA_ROLE} - set(spec.roles))
    if missing:
        raise ChangeControlError(
            f"institution {institution!r} declares no role {', '.join(repr(m) for m in missing)}: change control needs "
            f"roles {ADMIN_ROLE!r} (SOP administrators), {REVIEWER_ROLE!r} (reviewers) and {QA_ROLE!r}; add them to "
            f"sops/{institution}/institution.yaml"
        )
    loaded = load_sop_text(text, name=str(BUILTIN_SOP.name), institution=spec)
    return text, ledger.sha256_hex(text.encode()), loaded.definition


def store_version(
    session: Session, institution: str, sop: SopDefinition, text: str, sha: str, now: datetime
) -> SopVersion:
    version = SopVersion(
        institution=institution,
        sop_id=sop.id,
        version=sop.version,
        schema_version=sop.schema_version,
        sha256=sha,
        text=text,
        stored_at=now,
    )
    ledger.append(session, version, actor="system", action="sop_version.store")
    return version


# -- establish -----------------------------------------------------------------------------------
def establish(
    settings: Settings, institution: str, officer: Officer, *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Make the SOP files of ``institution`` its first Effective versions, signed "initial issue".

    Raises:
        SopNotFoundError, SopDefinitionError (a file is invalid: nothing is stored),
        ChangeControlError (versions exist already; change-control roles missing),
        AuthenticationError, NotAuthorizedError
    """
    now = now or utcnow()
    inst = Catalog(settings.sops_dir, settings.templates_dir).institution(institution)
    builtin: list[tuple[SopDefinition, str, str]] = []
    skipped = None
    try:
        cc_text, cc_sha, cc_def = builtin_sop(settings, institution)
        builtin.append((cc_def, cc_text, cc_sha))
    except ChangeControlError as exc:  # the SOPs can run; change control waits until the roles exist
        builtin, skipped = [], str(exc)
    init_db(settings.database_url)
    qa = guard.require_role(
        settings,
        officer,
        institution,
        QA_ROLE,
        action="sop.establish",
        object_type="sf_sop_version",
        object_id=institution,
        purpose="establish the first SOP versions",
    )
    out = []
    with write_session(settings.database_url) as s:
        # Rows stored by runs before versions had states (no events) are adopted, not refused.
        rows = s.exec(select(SopVersion).where(SopVersion.institution == institution)).all()
        legacy = {(v.sop_id, v.sha256): v for v in rows if state_of(s, v.id) is None}
        existing = [v for v in rows if (v.sop_id, v.sha256) not in legacy]
        if existing:
            raise ChangeControlError(
                f"institution {institution!r} has {len(existing)} SOP versions already: establish is only for an "
                "installation's first versions; a new version goes through `sopflow sop draft` and change control"
            )
        items = [(d.definition, d.text, d.sha256) for d in inst.sops.values()]
        for sop, text, sha in items + builtin:
            if sop.id == CHANGE_CONTROL_ID and (sop, text, sha) not in builtin:
                raise ChangeControlError(
                    f"sops/{institution}/{CHANGE_CONTROL_ID}.yaml: the id {CHANGE_CONTROL_ID!r} is "
                    "reserved for sopflow's built-in change-control SOP; rename the file and its id"
                )
            version = legacy.get((sop.id, sha)) or store_version(s, institution, sop, text, sha, now)
            months = DEFAULT_REVIEW_MONTHS
            append_version_event(
                s,
                version,
                "effective",
                actor=qa.id,
                printed_name=qa.printed_name,
                meaning="initial issue",
                data={
                    "effective_at": iso_utc(now),
                    "review_due": iso_utc(add_months(now, months)),
                    "initial_issue": True,
                },
                reason="initial issue: the version in force when sopflow was installed",
                at=now,
            )
            out.append({"sop_id": sop.id, "version": sop.version, "sha256": sha, "version_id": version.id})
    if skipped:
        out.append({"sop_id": CHANGE_CONTROL_ID, "skipped": skipped})
    return out


def find_version(session: Session, institution: str, sop_id: str, number: int) -> SopVersion:
    version = session.exec(
        select(SopVersion).where(
            SopVersion.institution == institution, SopVersion.sop_id == sop_id, SopVersion.version == number
        )
    ).first()
    if version is None:
        known = ", ".join(f"v{i.version.version}" for i in versions_of(session, institution, sop_id)) or "none"
        raise SopNotFoundError(f"{institution}/{sop_id} has no version {number}; its versions: {known}")
    return version


# -- periodic review, retirement, listing --------------------------------------------------------
def record_review(
    settings: Settings,
    institution: str,
    sop_id: str,
    officer: Officer,
    *,
    note: str,
    months: int | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Record a periodic review that found no change: QA signs, and the next review falls due
    ``months`` (default 24) from now. The version stays Effective.

    Raises:
        SopNotFoundError, SopNotEffectiveError, ChangeControlError, AuthenticationError, NotAuthorizedError
    """
    now = now or utcnow()
    note = (note or "").strip()
    if not note:
        raise ChangeControlError(f"{sop_id}: say what the review found (--note)")
    pinned = effective_sop(settings, institution, sop_id, now=now)
    qa = guard.require_role(
        settings,
        officer,
        institution,
        QA_ROLE,
        action="sop.review",
        object_type="sf_sop_version",
        object_id=f"{institution}/{sop_id}",
        purpose="record periodic reviews",
    )
    with write_session(settings.database_url) as s:
        version = _get(s, pinned.version_id)
        ev = state_of(s, version.id)
        data = {
            **(event_data(ev) if ev else {}),
            "periodic_review": True,
            "review_due": iso_utc(add_months(now, months or DEFAULT_REVIEW_MONTHS)),
        }
        data.pop("initial_issue", None)
        append_version_event(
            s,
            version,
            "effective",
            actor=qa.id,
            printed_name=qa.printed_name,
            meaning="periodic review: no change",
            data=data,
            reason=note,
            at=now,
        )
        return {"sop_id": sop_id, "version": version.version, "review_due": data["review_due"]}


def retire(settings: Settings, institution: str, sop_id: str, officer: Officer, *, reason: str) -> dict[str, Any]:
    """Withdraw an SOP from use (its Effective version turns Retired), signed by a QA officer.

    Raises:
        SopNotFoundError, SopNotEffectiveError, ChangeControlError, AuthenticationError, NotAuthorizedError
    """
    reason = (reason or "").strip()
    if not reason:
        raise ChangeControlError(f"{sop_id}: give the reason for retiring it (--reason)")
    pinned = effective_sop(settings, institution, sop_id)
    qa = guard.require_role(
        settings,
        officer,
        institution,
        QA_ROLE,
        action="sop.retire",
        object_type="sf_sop_version",
        object_id=f"{institution}/{sop_id}",
        purpose="retire SOPs",
    )
    with write_session(settings.database_url) as s:
        version = _get(s, pinned.version_id)
        append_version_event(
            s, version, "retired", actor=qa.id, printed_name=qa.printed_name, meaning="retired", reason=reason
        )
        return {"sop_id": sop_id, "version": version.version}


def _get(session: Session, version_id: str) -> SopVersion:
    version = session.get(SopVersion, version_id)
    if version is None:
        raise RecordError(f"SOP version {version_id} is missing from the record")
    return version


def list_versions(settings: Settings, institution: str, sop_id: str | None = None) -> list[dict[str, Any]]:
    """Every version (of one SOP) with its state and history of signed state changes."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        names = {u.id: u.username for u in s.exec(select(User))}
        out = []
        for i in versions_of(s, institution, sop_id):
            events = s.exec(
                select(SopVersionEvent)
                .where(SopVersionEvent.version_id == i.version.id)
                .order_by(col(SopVersionEvent.n))
            )
            rows, waits = coverage_of(s, i.version) if i.state in ("issued", "effective") else ([], None)
            out.append(
                {
                    "sop_id": i.version.sop_id,
                    "coverage": rows,
                    "waiting": waits if i.state == "issued" else None,
                    "version": i.version.version,
                    "state": i.state,
                    "sha256": i.version.sha256,
                    "since": i.since,
                    "data": i.data,
                    "version_id": i.version.id,
                    "history": [
                        {
                            "state": e.state,
                            "at": e.at,
                            "by": names.get(e.actor, e.actor),
                            "printed_name": e.printed_name,
                            "meaning": e.meaning,
                            "reason": e.reason,
                            "data": event_data(e),
                        }
                        for e in events
                    ],
                }
            )
        return out
