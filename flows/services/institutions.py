"""The service floor: institutions. The installation administrator's key, setting up an institution
with its first QA officer, scaffolding an institution folder, and the list of institutions.

Who is the installation administrator: whoever holds the key file ``SOPFLOW_ADMIN_KEY_FILE``
(default ``$SOPFLOW_HOME/admin.key``), created once by ``init_admin_key`` (``sopflow admin init``)
with mode 600 for the operating-system user that runs sopflow's administration; the database keeps
only its sha256 (``AdminKey``). ``guard.require_admin`` checks it. The administrator sets up
institutions, nothing else: they sign no step, record no training and add no other user; an
institution's own QA officers do that. Their actions are audited with actor ``admin`` and the
OS user, host and key in the payload.

The first account is still the bootstrap (``accounts.add_user`` with nobody acting): a one-site
installation needs no administrator key at all.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlmodel import col, select

from flows.config import Settings, bundled_dir
from flows.errors import RecordError, SopDefinitionError, did_you_mean
from flows.record import accounts, ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import AdminKey, InstitutionSetup, utcnow
from flows.record.users import add_user, current_grants, find_user, grant_role
from flows.services import guard
from flows.sop.catalog import INSTITUTION_FILE, Catalog
from flows.sop.model import ID_PATTERN

__all__ = ["SetupResult", "add_institution", "init_admin_key", "list_institutions", "scaffold_institution"]

FIRST_ROLE = guard.OFFICER_ROLE
SOURCES = {"en": "demo_hospital", "zh": "shenjiang_hospital"}
"""The built-in example an ``init`` copies by default, by language."""


@dataclass(frozen=True)
class SetupResult:
    institution: str
    username: str
    created_user: bool


def init_admin_key(settings: Settings) -> Path:
    """Create the installation administrator's key file (mode 600) and register its sha256, once.

    Raises:
        NotAuthorizedError: a key is registered already. RecordError: the file exists already.
    """
    path = settings.admin_key_path
    init_db(settings.database_url)
    admin = guard.Admin("", *_who())
    with read_session(settings.database_url) as s:
        existing = s.exec(select(AdminKey).order_by(col(AdminKey.created_at).desc()).limit(1)).first()
    if existing is not None:
        raise guard.refuse(
            settings,
            guard.UNAUTHENTICATED,
            "admin.init",
            "sf_admin_key",
            existing.id,
            f"an installation administrator's key is registered already (by {existing.os_user}@{existing.host} "
            f"at {existing.created_at:%Y-%m-%d %H:%M} UTC); it is the one in {path} on that host",
        )
    if path.exists():
        raise RecordError(f"{path} exists already but is not registered; move it away and run `sopflow admin init`")
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_session(settings.database_url) as s:
        row = AdminKey(
            key_sha256=ledger.sha256_hex(key.encode()), os_user=admin.os_user, host=admin.host, created_at=utcnow()
        )
        ledger.append(s, row, actor=guard.ADMIN, action="admin.key.create")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # written before the commit
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
    return path


def _who() -> tuple[str, str]:
    import getpass
    import socket

    return getpass.getuser(), socket.gethostname()


def add_institution(
    settings: Settings, institution: str, username: str, printed_name: str | None, password: str | None
) -> SetupResult:
    """Set up ``institution`` (its folder under the SOP folder, valid) with its first QA officer:
    a new account, or an existing one given role ``qa`` there. By the installation administrator.

    Raises:
        SopNotFoundError, SopDefinitionError: the institution's folder. NotAuthorizedError: not the
        administrator, or the institution has staff already. RecordError: bad user name or password.
    """
    inst = Catalog(settings.sops_dir, settings.templates_dir).institution(institution)
    if FIRST_ROLE not in inst.spec.roles:
        hint = did_you_mean(FIRST_ROLE, sorted(inst.spec.roles), "Roles")
        raise RecordError(
            f"institution {institution!r} has no role {FIRST_ROLE!r} in {INSTITUTION_FILE}: its first "
            f"officer is a QA officer. {hint}".rstrip()
        )
    admin = guard.require_admin(settings, action="institution.add", object_type="sf_institution", object_id=institution)
    with read_session(settings.database_url) as s:
        problem = _set_up_already(s, institution)
        user = find_user(s, username)
        if user is not None and not accounts.is_active(s, user.id):
            problem = problem or f"user {username!r} is disabled; a QA officer must enable it first"
    if problem:
        raise guard.refuse(settings, guard.ADMIN, "institution.add", "sf_institution", institution, problem)
    if user is None and (password is None or not (printed_name or "").strip()):
        raise RecordError(f"user {username!r} does not exist: give --name and a new password to create the account")
    payload_reason = f"set up by the installation administrator ({admin.os_user}@{admin.host})"
    with write_session(settings.database_url) as s:
        if again := _set_up_already(s, institution):  # another administrator was quicker
            raise RecordError(again)
        created = user is None
        officer = user or add_user(s, username, printed_name or "", password or "", actor=guard.ADMIN)
        grant_role(s, officer, institution, FIRST_ROLE, actor=guard.ADMIN)
        row = InstitutionSetup(
            institution=institution,
            name=inst.spec.name,
            first_officer_id=officer.id,
            admin_key_id=admin.key_id,
            os_user=admin.os_user,
            host=admin.host,
            added_at=utcnow(),
        )
        ledger.append(s, row, actor=guard.ADMIN, action="institution.add", reason=payload_reason)
    return SetupResult(institution, username, created)


def _set_up_already(session: Any, institution: str) -> str | None:
    setup = session.exec(select(InstitutionSetup).where(InstitutionSetup.institution == institution)).first()
    if setup is not None:
        return f"institution {institution!r} is set up already (at {setup.added_at:%Y-%m-%d %H:%M} UTC); its QA officers add staff"
    if current_grants(session, institution=institution):
        return (
            f"institution {institution!r} has staff already; its QA officers add users (sopflow user add --as QA_USER)"
        )
    return None


def list_institutions(settings: Settings) -> list[dict[str, Any]]:
    """Every institution folder under the SOP folder, with its name, whether it loads, and its staff."""
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        setups = {r.institution: r for r in s.exec(select(InstitutionSetup))}
        for inst_id in catalog.institutions():
            grants = current_grants(s, institution=inst_id)
            entry: dict[str, Any] = {
                "id": inst_id,
                "folder": str(catalog.sops_dir / inst_id),
                "set_up_by": "admin" if inst_id in setups else ("bootstrap or earlier" if grants else None),
                "staff": len({g.user_id for g in grants}),
                "qa_officers": len({g.user_id for g in grants if g.role == FIRST_ROLE}),
            }
            try:
                inst = catalog.institution(inst_id)
                entry.update(name=inst.spec.name, sops=len(inst.sops), valid=True, problems=[])
            except SopDefinitionError as exc:
                entry.update(name=None, sops=None, valid=False, problems=[str(p) for p in exc.problems])
            out.append(entry)
    return out


def scaffold_institution(
    settings: Settings,
    target: Path,
    *,
    name: str,
    timezone: str | None = None,
    language: str = "en",
    source: str | None = None,
) -> dict[str, Any]:
    """Write an institution folder at ``target`` (its name is the institution id) from a built-in
    example: ``institution.yaml`` with the name, zone and language given, ``products.yaml`` and the
    example's SOPs as a starting point, each file's header naming the new owner. The folder is
    validated like ``sopflow sop validate``; when it fails nothing stays written.

    Raises:
        RecordError: bad id, name, language or an existing folder. SopNotFoundError: unknown source.
        SopDefinitionError: the result does not validate (a bad time zone, say).
    """
    inst_id = target.name
    if not re.fullmatch(ID_PATTERN, inst_id):
        raise RecordError(f"folder {str(target)!r}: its name is the institution id and must match {ID_PATTERN}")
    if not name.strip():
        raise RecordError("--name: the institution's name is required (it is printed on every document)")
    if language not in SOURCES:
        raise RecordError(f"--language: expected one of {', '.join(SOURCES)}, got {language!r}")
    if timezone is not None:
        try:
            ZoneInfo(timezone)
        except (ValueError, ZoneInfoNotFoundError):
            raise RecordError(f"--timezone: {timezone!r} is not an IANA time zone (e.g. Asia/Shanghai)") from None
    if target.exists() and any(target.iterdir()):
        raise RecordError(f"{target} exists and is not empty; choose a new folder")
    library = Catalog(bundled_dir("sops"), settings.templates_dir)
    src = library.institution(source or SOURCES[language])
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        written = []
        for path in sorted(src.dir.glob("*.yaml")):
            text = _owned(path.read_text(encoding="utf-8"), name.strip(), src.spec.id)
            if path.name == INSTITUTION_FILE:
                text = _without_comment_block(text)
                text = _set_key(text, "id", inst_id)
                text = _set_key(text, "name", _yaml_str(name.strip()))
                text = _set_key(text, "language", language)
                if timezone:
                    text = _set_key(text, "timezone", timezone)
            (target / path.name).write_text(text, encoding="utf-8")
            written.append(path.name)
        result = Catalog(target.parent, settings.templates_dir).institution(inst_id)
    except BaseException:
        for f in target.glob("*.yaml"):
            f.unlink()
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return {"institution": inst_id, "folder": str(target), "files": written, "sops": sorted(result.sops)}


def _owned(text: str, owner: str, source: str) -> str:
    """The file with its first comment line naming the new owner (and no approval yet)."""
    head, sep, rest = text.partition("\n")
    line = f"# Owner: {owner} · Approval: (to assign before establish) · Effective: (not yet) · from sopflow's {source}"
    return (line + sep + rest) if head.startswith("#") else (line + "\n" + text)


def _without_comment_block(text: str) -> str:
    """The header line, then the file from its first non-comment line (the example's description goes)."""
    lines = text.splitlines(keepends=True)
    body = next((i for i, line in enumerate(lines[1:], start=1) if not line.startswith("#")), len(lines))
    return lines[0] + "".join(lines[body:])


def _set_key(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^{key}:.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: f"{key}: {value}", text, count=1)
    return text.rstrip("\n") + f"\n{key}: {value}\n"


def _yaml_str(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML string, quotes and all
