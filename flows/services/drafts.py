"""The service floor: a new SOP version through change control. ``check_draft_text`` (the web
editor's check as the administrator types), ``create_draft`` (an administrator of the institution,
role ``sop_admin``, stores validated YAML text as a Draft; version numbers are never reused) and
``submit_change`` (the administrator starts the built-in change-control SOP on a Draft and signs
its submission with the reason for change; the named reviewer and QA sign the rest through the
normal path, and ``flows.services.sweeps`` issues the approved version). Who may: asked of
``flows.services.guard``; the change-control SOP's own signing rule (the author never reviews or
approves) is ``flows.record.versions.change_control_problem``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlmodel import select

from flows.config import Settings
from flows.errors import ChangeControlError, SopNotEffectiveError
from flows.record import ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import SopVersion, User, iso_utc, utcnow
from flows.record.users import roles_of
from flows.record.versions import (
    ADMIN_ROLE,
    CHANGE_CONTROL_ID,
    REVIEWER_ROLE,
    PinnedSop,
    append_version_event,
    effective_version,
    state_of,
    version_definition,
    versions_of,
)
from flows.services import guard
from flows.services.guard import Officer
from flows.services.runs import start_run, wait_for_run
from flows.services.signing import submit_step
from flows.services.versions import builtin_sop, find_version, store_version
from flows.sop.catalog import INSTITUTION_FILE, Catalog
from flows.sop.editing import load_sop_text, schema_field_names, validate_sop_text
from flows.sop.load import load_institution_file

__all__ = ["check_draft_text", "create_draft", "submit_change"]


def check_draft_text(
    settings: Settings, institution: str, text: str, *, name: str = "draft.yaml", sop_id: str | None = None
) -> dict[str, Any]:
    """For the web editor, as the administrator types: ``problems`` (each with ``line``, ``path``,
    ``message`` and ``text``, the line ``sopflow sop validate`` prints) against the institution's
    roles and templates, and ``fields``: the JSON Schema's key names by place, for completion.

    Raises:
        SopNotFoundError: no such institution. SopDefinitionError: its institution.yaml is invalid.
    """
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    if institution not in catalog.institutions():
        catalog.products(institution)  # raises SopNotFoundError with a "did you mean"
    spec = load_institution_file(settings.sops_dir / institution / INSTITUTION_FILE)
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
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    if institution not in catalog.institutions():
        catalog.products(institution)  # raises SopNotFoundError with a "did you mean"
    spec = load_institution_file(settings.sops_dir / institution / INSTITUTION_FILE)
    expected = sop_id or Path(name).stem
    loaded = load_sop_text(text, name=name, institution=spec, templates_dir=settings.templates_dir, sop_id=expected)
    sop = loaded.definition
    if sop.id == CHANGE_CONTROL_ID:
        raise ChangeControlError(
            f"{name}: id {CHANGE_CONTROL_ID!r} is reserved for sopflow's built-in change-control SOP"
        )
    init_db(settings.database_url)
    user = guard.require_role(
        settings,
        Officer(username, password),
        institution,
        ADMIN_ROLE,
        action="sop.draft",
        object_type="sf_sop_version",
        object_id=f"{institution}/{sop.id}",
        purpose="create SOP drafts",
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
        version = store_version(s, institution, sop, text, sha, utcnow())
        append_version_event(s, version, "draft", actor=user.id, data={"source": name}, reason=reason)
        return {"version_id": version.id, "sop_id": sop.id, "version": sop.version, "sha256": sha}


def _pinned_change_control(settings: Settings, institution: str) -> PinnedSop:
    """The built-in change-control SOP's effective version, stored (and the older one superseded) when sopflow's changed."""
    text, sha, sop = builtin_sop(settings, institution)
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
            version = store_version(s, institution, sop, text, sha, utcnow())
            if current is not None:
                append_version_event(
                    s, current, "superseded", actor="system", reason="sopflow's built-in change-control SOP changed"
                )
            append_version_event(
                s,
                version,
                "effective",
                actor="system",
                reason="built into this sopflow release",
                data={"effective_at": iso_utc(utcnow())},
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
    reason = (reason or "").strip()
    if not reason:
        raise ChangeControlError(f"{sop_id} v{number}: give the reason for change (--reason)")
    init_db(settings.database_url)
    user = guard.require_role(
        settings,
        Officer(username, password),
        institution,
        ADMIN_ROLE,
        action="sop.submit",
        object_type="sf_sop_version",
        object_id=f"{institution}/{sop_id}",
        purpose="submit SOP changes",
    )
    with read_session(settings.database_url) as s:
        version = find_version(s, institution, sop_id, number)
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
    started = start_run(
        settings,
        institution,
        CHANGE_CONTROL_ID,
        {"sop_id": sop_id, "version": str(number), "sha256": sha, "reviewer": reviewer},
        username,
        password,
        pinned=pinned,
    )
    with write_session(settings.database_url) as s:
        version = find_version(s, institution, sop_id, number)
        append_version_event(
            s, version, "in_review", actor=user.id, data={"run_id": started.run_id, "reviewer": reviewer}, reason=reason
        )
    wait_for_run(settings, started.run_id, step="submit", timeout=timeout)
    submit_step(settings, started.run_id, "submit", username, password, {"reason": reason})
    return started.run_id
