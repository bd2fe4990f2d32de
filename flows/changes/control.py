"""SOP change control: establish, draft, submit, issue, make effective, review, retire.

The rules, and who may do what:

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
  approves (``versions.change_control_problem``).
- ``flows.changes.sweep.sweep`` (the executor's periodic sweep) issues approved versions,
  assigns training, makes due versions Effective and sends reminders.
- ``record_review`` (periodic review, no change) and ``retire``: a QA officer, signed.

Service layer: the CLI (``flows.cli.changes``) and the web app call these; the library raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Session, col, select

from flows.admin import Officer, sign_in
from flows.config import Settings
from flows.errors import (
    ChangeControlError,
    NotAuthorizedError,
    RecordError,
    SopNotEffectiveError,
    SopNotFoundError,
)
from flows.record import ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import (
    SopVersion,
    User,
    utcnow,
)
from flows.record.users import roles_of
from flows.record.versions import (
    ADMIN_ROLE,
    CHANGE_CONTROL_ID,
    REVIEWER_ROLE,
    activate_due,
    append_event,
    effective_version,
    event_data,
    newest_effective,
    state_of,
    versions_of,
)
from flows.sop.catalog import Catalog
from flows.sop.model import CheckStepSpec, HumanStepSpec, SopDefinition

__all__ = [
    "BUILTIN_SOP",
    "DEFAULT_REVIEW_MONTHS",
    "DEFAULT_TRAINING_DAYS",
    "REVIEW_NOTICE",
    "PinnedSop",
    "add_months",
    "check_draft_text",
    "create_draft",
    "effective_sop",
    "establish",
    "list_versions",
    "record_review",
    "retire",
    "signing_roles",
    "submit_change",
    "version_definition",
]

BUILTIN_SOP = Path(__file__).resolve().parent.parent / "builtin" / "change_control.yaml"
DEFAULT_TRAINING_DAYS = 14
DEFAULT_REVIEW_MONTHS = 24
REVIEW_NOTICE = timedelta(days=30)
"""How long before a periodic review is due the administrators and QA are reminded."""
QA_ROLE = "qa"


@dataclass(frozen=True)
class PinnedSop:
    """The version a run starts on: its row id, definition and text hash."""

    version_id: str
    definition: SopDefinition
    sha256: str


def add_months(when: datetime, months: int) -> datetime:
    """``when`` plus whole calendar months (the day clamped to the month's length)."""
    import calendar

    month0 = when.month - 1 + months
    year, month = when.year + month0 // 12, month0 % 12 + 1
    return when.replace(year=year, month=month, day=min(when.day, calendar.monthrange(year, month)[1]))


def version_definition(version: SopVersion) -> SopDefinition:
    return SopDefinition.model_validate(yaml.safe_load(version.text))


def signing_roles(sop: SopDefinition) -> set[str]:
    """Every role that signs a step of the SOP (a failed check's disposition role too)."""
    roles = {s.role for s in sop.steps if isinstance(s, HumanStepSpec)}
    roles |= {
        s.deviation.disposition_role for s in sop.steps if isinstance(s, CheckStepSpec) and s.on_fail == "deviation"
    }
    return roles


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _refuse(settings: Settings, user: User, action: str, object_id: str, problem: str) -> NotAuthorizedError:
    with write_session(settings.database_url) as s:
        ledger.audit(
            s,
            actor=user.id,
            action=f"{action}.refused",
            object_type="sf_sop_version",
            object_id=object_id,
            payload={"problem": problem},
            reason=problem,
        )
    return NotAuthorizedError(problem)


def _holder(
    settings: Settings,
    username: str,
    password: str,
    institution: str,
    role: str,
    action: str,
    object_id: str,
    purpose: str,
) -> User:
    """Sign in (audited) and check the user holds ``role`` at ``institution``; refused and audited otherwise."""
    user = sign_in(settings, username, password, purpose)
    with read_session(settings.database_url) as s:
        held = roles_of(s, user.id, institution)
    if role not in held:
        raise _refuse(
            settings,
            user,
            action,
            object_id,
            f"user {username!r} may not {purpose} at {institution!r}: that takes role {role!r} there "
            f"(they hold {', '.join(sorted(held)) or 'no role'})",
        )
    return user


def _builtin(settings: Settings, institution: str) -> tuple[str, str, SopDefinition]:
    """The built-in change-control SOP's text, sha256 and definition, checked against the institution's roles."""
    from flows.sop.editing import load_sop_text
    from flows.sop.load import load_institution_file

    text = BUILTIN_SOP.read_text(encoding="utf-8")
    spec = load_institution_file(settings.sops_dir / institution / "institution.yaml")
    missing = sorted({ADMIN_ROLE, REVIEWER_ROLE, QA_ROLE} - set(spec.roles))
    if missing:
        raise ChangeControlError(
            f"institution {institution!r} declares no role {', '.join(repr(m) for m in missing)}: change control needs "
            f"roles {ADMIN_ROLE!r} (SOP administrators), {REVIEWER_ROLE!r} (reviewers) and {QA_ROLE!r}; add them to "
            f"sops/{institution}/institution.yaml"
        )
    loaded = load_sop_text(text, name=str(BUILTIN_SOP.name), institution=spec)
    return text, ledger.sha256_hex(text.encode()), loaded.definition


def _store(session: Session, institution: str, sop: SopDefinition, text: str, sha: str, now: datetime) -> SopVersion:
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
        cc_text, cc_sha, cc_def = _builtin(settings, institution)
        builtin.append((cc_def, cc_text, cc_sha))
    except ChangeControlError as exc:  # the SOPs can run; change control waits until the roles exist
        builtin, skipped = [], str(exc)
    init_db(settings.database_url)
    qa = _holder(
        settings,
        officer.username,
        officer.password,
        institution,
        QA_ROLE,
        "sop.establish",
        institution,
        "establish the first SOP versions",
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
            version = legacy.get((sop.id, sha)) or _store(s, institution, sop, text, sha, now)
            months = DEFAULT_REVIEW_MONTHS
            append_event(
                s,
                version,
                "effective",
                actor=qa.id,
                printed_name=qa.printed_name,
                meaning="initial issue",
                data={"effective_at": _iso(now), "review_due": _iso(add_months(now, months)), "initial_issue": True},
                reason="initial issue: the version in force when sopflow was installed",
                at=now,
            )
            out.append({"sop_id": sop.id, "version": sop.version, "sha256": sha, "version_id": version.id})
    if skipped:
        out.append({"sop_id": CHANGE_CONTROL_ID, "skipped": skipped})
    return out


# -- runs start on the effective version ---------------------------------------------------------
def _known_ids(settings: Settings, session: Session, institution: str) -> set[str]:
    ids = {v.sop_id for v in session.exec(select(SopVersion).where(SopVersion.institution == institution))}
    folder = settings.sops_dir / institution
    if folder.is_dir():
        ids |= {p.stem for p in folder.glob("*.yaml") if p.name not in ("institution.yaml", "products.yaml")}
    return ids


def effective_sop(settings: Settings, institution: str, sop_id: str, *, now: datetime | None = None) -> PinnedSop:
    """The version of ``sop_id`` Effective now (an Issued one whose date has come turns Effective first).

    Raises:
        SopNotFoundError: no such institution or SOP. SopNotEffectiveError: no version is Effective.
    """
    import difflib

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
        known = _known_ids(settings, s, institution)
        institutions = set(Catalog(settings.sops_dir, settings.templates_dir).institutions()) | set(
            s.exec(select(SopVersion.institution))
        )
    if institution not in institutions:
        close = difflib.get_close_matches(institution, sorted(institutions), n=1)
        raise SopNotFoundError(f"no institution {institution!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
    if sop_id not in known:
        close = difflib.get_close_matches(sop_id, sorted(known), n=1)
        hint = f"Did you mean {close[0]!r}?" if close else f"Known SOPs: {', '.join(sorted(known)) or 'none'}."
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
        for i in infos
    )
    raise SopNotEffectiveError(f"{institution}/{sop_id} has no Effective version, so no run may start: {why}. {states}")


# -- drafts ---
def check_draft_text(
    settings: Settings, institution: str, text: str, *, name: str = "draft.yaml", sop_id: str | None = None
) -> dict[str, Any]:
    """For the web editor, as the administrator types: ``problems`` (each with ``line``, ``path``,
    ``message`` and ``text``, the line ``sopflow sop validate`` prints) against the institution's
    roles and templates, and ``fields``: the JSON Schema's key names by place, for completion.

    Raises:
        SopNotFoundError: no such institution. SopDefinitionError: its institution.yaml is invalid.
    """
    from flows.sop.editing import schema_field_names, validate_sop_text
    from flows.sop.load import load_institution_file

    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    if institution not in catalog.institutions():
        catalog.products(institution)  # raises SopNotFoundError with a "did you mean"
    spec = load_institution_file(settings.sops_dir / institution / "institution.yaml")
    return {
        "problems": validate_sop_text(
            text, name=name, institution=spec, templates_dir=settings.templates_dir, sop_id=sop_id
        ),
        "fields": schema_field_names(),
    }


def create_draft(
    settings: Settings,
    institution: str,
    text: str,
    *,
    name: str,
    username: str,
    password: str,
    sop_id: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Store SOP YAML text as a Draft version (an administrator of the institution only).

    ``name``: how problems name the text (the file's path); ``sop_id``: the id it must carry
    (default: the file name's stem).

    Raises:
        SopDefinitionError (every problem, as `sopflow sop validate` prints them), SopNotFoundError,
        ChangeControlError (reserved id, version number used, same text as a version), AuthenticationError,
        NotAuthorizedError
    """
    from flows.sop.editing import load_sop_text
    from flows.sop.load import load_institution_file

    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    if institution not in catalog.institutions():
        catalog.products(institution)  # raises SopNotFoundError with a "did you mean"
    spec = load_institution_file(settings.sops_dir / institution / "institution.yaml")
    expected = sop_id or Path(name).stem
    loaded = load_sop_text(text, name=name, institution=spec, templates_dir=settings.templates_dir, sop_id=expected)
    sop = loaded.definition
    if sop.id == CHANGE_CONTROL_ID:
        raise ChangeControlError(
            f"{name}: id {CHANGE_CONTROL_ID!r} is reserved for sopflow's built-in change-control SOP"
        )
    init_db(settings.database_url)
    user = _holder(
        settings,
        username,
        password,
        institution,
        ADMIN_ROLE,
        "sop.draft",
        f"{institution}/{sop.id}",
        "create SOP drafts",
    )
    sha = ledger.sha256_hex(text.encode())
    with write_session(settings.database_url) as s:
        infos = versions_of(s, institution, sop.id)
        for i in infos:
            if i.version.sha256 == sha:
                raise ChangeControlError(
                    f"{name}: the same text as {sop.id} v{i.version.version} ({i.state}); nothing to draft"
                )
        highest = max((i.version.version for i in infos), default=0)
        if sop.version <= highest:
            raise ChangeControlError(
                f"{name}:{loaded.lines.line('version')}: version: {sop.id} v{sop.version} cannot be drafted: version "
                f"numbers are never reused and v{highest} exists; set version: {highest + 1}"
            )
        version = _store(s, institution, sop, text, sha, utcnow())
        append_event(s, version, "draft", actor=user.id, data={"source": name}, reason=reason)
        return {"version_id": version.id, "sop_id": sop.id, "version": sop.version, "sha256": sha}


def _version(session: Session, institution: str, sop_id: str, number: int) -> SopVersion:
    version = session.exec(
        select(SopVersion).where(
            SopVersion.institution == institution, SopVersion.sop_id == sop_id, SopVersion.version == number
        )
    ).first()
    if version is None:
        known = ", ".join(f"v{i.version.version}" for i in versions_of(session, institution, sop_id)) or "none"
        raise SopNotFoundError(f"{institution}/{sop_id} has no version {number}; its versions: {known}")
    return version


def _pinned_change_control(settings: Settings, institution: str) -> PinnedSop:
    """The built-in change-control SOP's effective version, stored (and the older one superseded) when sopflow's changed."""
    text, sha, sop = _builtin(settings, institution)
    with write_session(settings.database_url) as s:
        current = effective_version(s, institution, CHANGE_CONTROL_ID)
        if current is None or current.sha256 != sha:
            if (
                current is None
                and not s.exec(select(SopVersion.id).where(SopVersion.institution == institution)).first()
            ):
                raise SopNotEffectiveError(
                    f"institution {institution!r} has no SOP versions yet: establish them first "
                    f"(`sopflow sop establish {institution} --as <QA officer>`)"
                )
            version = _store(s, institution, sop, text, sha, utcnow())
            if current is not None:
                append_event(
                    s, current, "superseded", actor="system", reason="sopflow's built-in change-control SOP changed"
                )
            append_event(
                s,
                version,
                "effective",
                actor="system",
                reason="built into this sopflow release",
                data={"effective_at": _iso(utcnow())},
            )
            current = version
        return PinnedSop(current.id, version_definition(current), current.sha256)


def submit_change(
    settings: Settings,
    institution: str,
    sop_id: str,
    number: int,
    *,
    reviewer: str,
    reason: str,
    username: str,
    password: str,
    timeout: float = 90.0,
) -> str:
    """Put a Draft under change control: start the built-in SOP on it and sign its submission
    (the author's reason for change). Returns the change-control run's id.

    Raises:
        SopNotFoundError, ChangeControlError, SopInputError, AuthenticationError, NotAuthorizedError, EngineError
    """
    from flows import service

    reason = (reason or "").strip()
    if not reason:
        raise ChangeControlError(f"{sop_id} v{number}: give the reason for change (--reason)")
    init_db(settings.database_url)
    user = _holder(
        settings,
        username,
        password,
        institution,
        ADMIN_ROLE,
        "sop.submit",
        f"{institution}/{sop_id}",
        "submit SOP changes",
    )
    with read_session(settings.database_url) as s:
        version = _version(s, institution, sop_id, number)
        ev = state_of(s, version.id)
        if ev is None or ev.state != "draft":
            raise ChangeControlError(
                f"{sop_id} v{number} is {ev.state if ev else 'not a draft'}: only a draft can be "
                "submitted to change control"
            )
        rev = s.exec(select(User).where(User.username == reviewer)).first()
        if rev is None or REVIEWER_ROLE not in roles_of(s, rev.id, institution):
            raise ChangeControlError(
                f"reviewer {reviewer!r} must be a user holding role {REVIEWER_ROLE!r} at {institution!r}"
            )
        if rev.id in (ev.actor, user.id):
            raise ChangeControlError(
                f"reviewer {reviewer!r} is the author of {sop_id} v{number}: name another reviewer"
            )
        sha = version.sha256
    pinned = _pinned_change_control(settings, institution)
    started = service.start_run(
        settings,
        institution,
        CHANGE_CONTROL_ID,
        {"sop_id": sop_id, "version": str(number), "sha256": sha, "reviewer": reviewer},
        username,
        password,
        pinned=pinned,
    )
    with write_session(settings.database_url) as s:
        version = _version(s, institution, sop_id, number)
        append_event(
            s, version, "in_review", actor=user.id, data={"run_id": started.run_id, "reviewer": reviewer}, reason=reason
        )
    service.wait_for_run(settings, started.run_id, step="submit", timeout=timeout)
    service.submit_step(settings, started.run_id, "submit", username, password, {"reason": reason})
    return started.run_id


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
    qa = _holder(
        settings,
        officer.username,
        officer.password,
        institution,
        QA_ROLE,
        "sop.review",
        f"{institution}/{sop_id}",
        "record periodic reviews",
    )
    with write_session(settings.database_url) as s:
        version = _get(s, pinned.version_id)
        ev = state_of(s, version.id)
        data = {
            **(event_data(ev) if ev else {}),
            "periodic_review": True,
            "review_due": _iso(add_months(now, months or DEFAULT_REVIEW_MONTHS)),
        }
        data.pop("initial_issue", None)
        append_event(
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
    qa = _holder(
        settings,
        officer.username,
        officer.password,
        institution,
        QA_ROLE,
        "sop.retire",
        f"{institution}/{sop_id}",
        "retire SOPs",
    )
    with write_session(settings.database_url) as s:
        version = _get(s, pinned.version_id)
        append_event(s, version, "retired", actor=qa.id, printed_name=qa.printed_name, meaning="retired", reason=reason)
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
            from flows.record.tables import SopVersionEvent

            events = s.exec(
                select(SopVersionEvent)
                .where(SopVersionEvent.version_id == i.version.id)
                .order_by(col(SopVersionEvent.n))
            )
            out.append(
                {
                    "sop_id": i.version.sop_id,
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
