"""The service floor: the web's SOP editor, versions and diff pages, over change control
(``flows.services.versions``).

- ``guard.require_sop_admin``: the editor is for administrators of the institution (role ``sop_admin``).
- ``editor_start``: the text a new draft starts from (the newest version, numbered one above).
- ``check_text`` / ``save_draft``: as the administrator types, and Save; over
  ``flows.services.drafts.check_draft_text`` and ``create_draft`` (which validates, checks the
  role again with the password and audits a refusal).
- ``sop_versions``: an SOP's versions with their states, dates, the change-control run and the
  pairs to compare; ``version_diff``: what changed between two versions (``sopflow sop diff``).

The pages call these and hold no business rule.
"""

from __future__ import annotations

import re
from typing import Any

from flows.config import Settings
from flows.errors import NotAuthorizedError, NotFoundError, SopNotFoundError
from flows.record.db import init_db, read_session
from flows.record.tables import SopVersion
from flows.record.users import find_user
from flows.record.versions import ADMIN_ROLE, CHANGE_CONTROL_ID
from flows.services import guard
from flows.services.drafts import check_draft_text, create_draft
from flows.services.transfer import diff_versions
from flows.services.versions import list_versions

__all__ = [
    "NEW_SOP",
    "admin_institutions",
    "check_text",
    "draft_id",
    "editor_start",
    "is_sop_admin",
    "save_draft",
    "sop_versions",
    "version_diff",
]

_ID = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_LINE = re.compile(r"^version:[ \t]*\d+[ \t]*$", re.M)
_ID_LINE = re.compile(r"^id:[ \t]*['\"]?([a-z][a-z0-9_]*)['\"]?[ \t]*(#.*)?$", re.M)

NEW_SOP = """# Owner: … · Approval: … · Effective: when change control says
schema_version: 1
id: new_sop
title: New SOP
version: 1
params:
  coi: {type: text, label: Chain of identity}
steps:
  - id: first_step
    kind: record
    role: choose_a_role
    meaning: Performed the first step
    fields:
      note: {type: text, label: Note}
"""
"""The text a new SOP starts from in the editor (``choose_a_role``: the problem shown lists the institution's roles)."""


def is_sop_admin(settings: Settings, username: str, institution: str) -> bool:
    """Whether the user may use the SOP editor at the institution (``guard.require_sop_admin``)."""
    try:
        guard.require_sop_admin(settings, username, institution)
    except (NotAuthorizedError, NotFoundError):
        return False
    return True


def admin_institutions(settings: Settings, username: str) -> list[str]:
    """The institutions where the user is an SOP administrator (holds ``sop_admin``)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        return sorted(guard.institutions_of(s, user.id, ADMIN_ROLE)) if user is not None else []


def _check_id(institution: str, sop_id: str) -> None:
    if not _ID.match(sop_id) or not _ID.match(institution):
        raise SopNotFoundError(f"{institution}/{sop_id}: not an SOP id (lower-case letters, digits and _)")
    if sop_id == CHANGE_CONTROL_ID:
        raise NotAuthorizedError(
            f"{CHANGE_CONTROL_ID!r} is sopflow's built-in change-control SOP: it ships with "
            "sopflow and is not edited here"
        )


def editor_start(settings: Settings, institution: str, sop_id: str | None) -> dict[str, Any]:
    """What the editor opens with: ``text`` (the newest version's exact text, or the file's, with
    ``version:`` set to ``next_version``), ``based_on`` (that version's number, or None) and
    ``next_version`` (one above every version: numbers are never reused).

    Raises:
        SopNotFoundError: no version and no file of ``sop_id`` at the institution.
    """
    if sop_id is None:
        return {"text": NEW_SOP, "based_on": None, "next_version": 1}
    _check_id(institution, sop_id)
    versions = list_versions(settings, institution, sop_id)
    path = settings.sops_dir / institution / f"{sop_id}.yaml"
    if versions:
        newest = max(versions, key=lambda v: v["version"])
        with read_session(settings.database_url) as s:
            row = s.get(SopVersion, newest["version_id"])
            text = row.text if row is not None else ""
        based_on, number = newest["version"], newest["version"] + 1
    elif path.is_file():
        text, based_on, number = path.read_text(encoding="utf-8"), None, 1
    else:
        raise SopNotFoundError(
            f"no SOP {sop_id!r} at {institution!r}: neither a version nor sops/{institution}/{sop_id}.yaml"
        )
    text = _VERSION_LINE.sub(f"version: {number}", text, count=1)
    return {"text": text, "based_on": based_on, "next_version": number}


def _name(sop_id: str | None) -> str:
    return f"{sop_id or 'draft'}.yaml"


def draft_id(text: str) -> str | None:
    """The ``id:`` a new SOP's text gives (its top-level line), or None."""
    m = _ID_LINE.search(text)
    return m.group(1) if m else None


def check_text(settings: Settings, username: str, institution: str, text: str, sop_id: str | None) -> dict[str, Any]:
    """``problems`` and ``fields`` for the editor (``flows.services.drafts.check_draft_text``), for an
    administrator; problems are named as ``<sop_id>.yaml`` like ``sopflow sop validate`` names the file.

    Raises:
        NotAuthorizedError (not an administrator), SopNotFoundError
    """
    guard.require_sop_admin(settings, username, institution)
    if sop_id is not None:
        _check_id(institution, sop_id)
    return check_draft_text(settings, institution, text, name=_name(sop_id or draft_id(text)), sop_id=sop_id)


def save_draft(
    settings: Settings,
    username: str,
    password: str,
    institution: str,
    text: str,
    sop_id: str | None,
    reason: str | None = None,
) -> dict[str, Any]:
    """Store the text as a Draft (``flows.services.drafts.create_draft``): a new SOP (``sop_id``
    None) takes the id its text gives. Returns the draft's ``version_id``, ``sop_id``, ``version``, ``sha256``.

    Raises:
        SopDefinitionError, ChangeControlError, SopNotFoundError, AuthenticationError, NotAuthorizedError
        (audited by ``create_draft``)
    """
    if sop_id is not None:
        _check_id(institution, sop_id)
    target = sop_id or draft_id(text)
    return create_draft(
        settings,
        institution,
        text,
        name=_name(target),
        username=username,
        password=password,
        sop_id=target,
        reason=(reason or "").strip() or None,
    )


def sop_versions(settings: Settings, institution: str, sop_id: str) -> list[dict[str, Any]]:
    """The SOP's versions, newest first, each with ``state``, ``sha256``, ``effective_at`` (when it
    turned or turns Effective), ``review_due`` (while Effective), ``run_id`` (its change-control
    run, whose record is its approval history), ``previous`` (the number before it, to compare)
    ``coverage`` (Issued and Effective: per role that signs in it, trained/needed), ``waiting`` (why an
    Issued version may not turn Effective yet) and ``history`` (the signed state
    changes, as ``sopflow sop versions`` lists them)."""
    rows = list_versions(settings, institution, sop_id)
    out = []
    previous = None
    for v in sorted(rows, key=lambda r: r["version"]):
        effective_at = next(
            (h["data"].get("effective_at") for h in reversed(v["history"]) if h["data"].get("effective_at")), None
        )
        run_id = next((h["data"]["run_id"] for h in reversed(v["history"]) if h["data"].get("run_id")), None)
        out.append(
            {
                "version": v["version"],
                "state": v["state"],
                "since": v["since"],
                "sha256": v["sha256"],
                "effective_at": effective_at,
                "review_due": v["data"].get("review_due") if v["state"] == "effective" else None,
                "training_due": v["data"].get("training_due") if v["state"] == "issued" else None,
                "run_id": run_id,
                "coverage": v["coverage"],
                "waiting": v["waiting"],
                "previous": previous,
                "history": v["history"],
            }
        )
        previous = v["version"]
    return out[::-1]


def version_diff(
    settings: Settings, institution: str, sop_id: str, old: str | int | None = None, new: str | int | None = None
) -> dict[str, Any]:
    """What changed from version ``old`` to ``new`` (``flows.services.transfer.diff_versions``; by
    default the newest version and the one before it): each change's ``kind`` (added, removed,
    moved, changed), ``where``, and ``text``, the line ``sopflow sop diff`` prints.

    Raises:
        SopNotFoundError: no such version (or fewer than two).
    """
    numbers = sorted(v["version"] for v in list_versions(settings, institution, sop_id))
    if old in (None, "") and new in (None, ""):
        if len(numbers) < 2:
            raise SopNotFoundError(f"{institution}/{sop_id} has {len(numbers)} version(s): nothing to compare")
        old, new = numbers[-2], numbers[-1]
    try:
        a, b = int(str(old)), int(str(new))
    except ValueError:
        raise SopNotFoundError(f"versions {old!r} and {new!r}: give two version numbers, e.g. old=1&new=2") from None
    changes = diff_versions(settings, institution, sop_id, a, b)
    return {
        "institution": institution,
        "sop_id": sop_id,
        "old": a,
        "new": b,
        "numbers": numbers,
        "changes": [{"kind": c.kind, "where": c.where, "text": str(c)} for c in changes],
    }
