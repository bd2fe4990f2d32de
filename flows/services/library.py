"""The service floor: the SOP library as people see it (the web's SOP pages and start form).

- ``startable_sops``: the SOPs a user may start (``guard.start_problem``), with params and products.
- ``sop_library``: per institution, SOP versions with state and sha256.
- ``describe_sop``: one SOP in force as plain data, every key the file gives.
- ``institution_timezone``, ``field_view``: small helpers pages share.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import FlowsError, SopDefinitionError, SopNotFoundError
from flows.record.db import init_db, read_session
from flows.record.tables import SopVersion
from flows.record.users import find_user
from flows.record.versions import effective_sop, state_of
from flows.services import guard
from flows.sop.catalog import INSTITUTION_FILE, Catalog
from flows.sop.load import load_institution_file
from flows.sop.model import FieldSpec

__all__ = [
    "describe_sop",
    "field_view",
    "institution_timezone",
    "may_read",
    "sop_library",
    "sop_library_for",
    "startable_sops",
]


def institution_timezone(settings: Settings, institution: str) -> str:
    """The institution's time zone (UTC when its file cannot be read: pages say which zone they show)."""
    path = settings.sops_dir / institution / INSTITUTION_FILE
    try:
        return _timezone(path, path.stat().st_mtime)
    except (OSError, SopDefinitionError):
        return "UTC"


@lru_cache(maxsize=64)
def _timezone(path: Path, mtime: float) -> str:
    """The file read once per version of it (its modification time): every inbox asks."""
    return load_institution_file(path).timezone


def field_view(name: str, spec: FieldSpec) -> dict[str, Any]:
    """A field as a form renders it: every key the SOP gave (new keys pass through untouched)."""
    return {"name": name, **spec.model_dump(exclude_none=True, mode="json")}


def startable_sops(settings: Settings, username: str) -> list[dict[str, Any]]:
    """The SOPs this user may start (an Effective version at an institution where ``guard.start_problem``
    finds nothing against them), with params and products; an institution whose files are broken is
    listed with its problems."""
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        mine = guard.institutions_of(s, user.id) if user is not None else set()
    out: list[dict[str, Any]] = []
    if user is None:
        return out
    for inst_id in catalog.institutions():
        if inst_id not in mine:
            continue
        try:
            inst = catalog.institution(inst_id)
        except SopDefinitionError as exc:
            out.append({"institution": inst_id, "problems": [str(p) for p in exc.problems]})
            continue
        products = {k: {"name": p.name, "unconfirmed": list(p.unconfirmed)} for k, p in inst.products.items()}
        for sop_id in inst.sops:
            try:  # what runs is the Effective version (change control), not the file
                pinned = effective_sop(settings, inst_id, sop_id)
            except FlowsError:
                continue
            d = pinned.definition
            with read_session(settings.database_url) as s:
                if guard.start_problem(s, user, inst_id, d) is not None:
                    continue
            out.append(
                {
                    "institution": inst_id,
                    "sop_id": sop_id,
                    "title": d.title,
                    "version": d.version,
                    "sha256": pinned.sha256,
                    "params": [field_view(n, f) for n, f in d.params.items()],
                    "products": products,
                    "problems": [],
                }
            )
    return out


def sop_library(settings: Settings) -> list[dict[str, Any]]:
    """Per institution, its SOPs with version, state and sha256: the versions change control
    records, with their states (``effective``, ``draft``, …); for an institution with no version yet
    (not established), the files, and the stored revisions that differ from them (``superseded``)."""
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        stored = list(s.exec(select(SopVersion).order_by(col(SopVersion.stored_at))))
        states = {v.id: ev.state if (ev := state_of(s, v.id)) is not None else "unknown" for v in stored}
    out = []
    for inst_id in sorted(set(catalog.institutions()) | {v.institution for v in stored}):
        entry: dict[str, Any] = {"id": inst_id, "name": inst_id, "problems": [], "sops": []}
        current: dict[str, str] = {}
        titles: dict[str, str] = {}
        try:
            inst = catalog.institution(inst_id)
            entry["name"] = inst.spec.name
            for sop_id, loaded in inst.sops.items():
                current[sop_id] = loaded.sha256
                titles[sop_id] = loaded.definition.title
        except (SopDefinitionError, SopNotFoundError) as exc:
            entry["problems"] = [str(p) for p in getattr(exc, "problems", [exc])]
        versions = sorted((v for v in stored if v.institution == inst_id), key=lambda v: (v.sop_id, v.version))
        if versions:
            entry["sops"] = [
                {
                    "id": v.sop_id,
                    "title": titles.get(v.sop_id),
                    "version": v.version,
                    "sha256": v.sha256,
                    "state": states[v.id],
                    "file": current.get(v.sop_id) == v.sha256,
                }
                for v in versions
            ]
        else:
            entry["sops"] = [
                {
                    "id": i,
                    "title": titles[i],
                    "version": catalog.get_sop(inst_id, i).definition.version,
                    "sha256": sha,
                    "state": "in_force",
                    "file": True,
                }
                for i, sha in current.items()
            ]
        out.append(entry)
    return out


def may_read(settings: Settings, username: str, institution: str) -> bool:
    """Whether ``username`` may see ``institution``'s SOPs, versions and diffs (``guard.may_read``)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return guard.may_read(s, username, institution)


def sop_library_for(settings: Settings, username: str) -> list[dict[str, Any]]:
    """``sop_library``, only the institutions where ``username`` holds a role (``guard.may_read``)."""
    rows = sop_library(settings)
    with read_session(settings.database_url) as s:
        return [r for r in rows if guard.may_read(s, username, r["id"])]


def describe_sop(settings: Settings, institution: str, sop_id: str) -> dict[str, Any]:
    """One SOP in force (its Effective version; the file in ``sops/`` when none is Effective, with
    ``in_force`` False), as plain data: params, steps (every key given), roles, products.

    Raises:
        SopNotFoundError, SopDefinitionError
    """
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    inst = catalog.institution(institution)
    if sop_id not in inst.sops:
        catalog.get_sop(institution, sop_id)  # raises SopNotFoundError with a "did you mean"
    loaded = inst.sops[sop_id]
    try:  # what runs is the Effective version (change control); the file may be a later draft's source
        pinned = effective_sop(settings, institution, sop_id)
        d, sha256, in_force = pinned.definition, pinned.sha256, True
    except FlowsError:
        d, sha256, in_force = loaded.definition, loaded.sha256, False
    steps = []
    for step in d.steps:
        dumped = step.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        fields = dumped.pop("fields", {}) or {}
        steps.append(
            {
                "id": step.id,
                "kind": step.kind,
                "title": step.title,
                "role": dumped.pop("role", None),
                "fields": [{"name": n, **f} for n, f in fields.items()],
                "other": {k: v for k, v in dumped.items() if k not in ("id", "kind", "title")},
            }
        )
    extra = d.model_dump(
        mode="json",
        exclude_none=True,
        exclude={"schema_version", "id", "title", "version", "description", "params", "steps"},
    )
    return {
        "institution": institution,
        "institution_name": inst.spec.name,
        "id": d.id,
        "title": d.title,
        "version": d.version,
        "description": d.description,
        "sha256": sha256,
        "in_force": in_force,
        "roles": {k: r.label for k, r in inst.spec.roles.items()},
        "params": [field_view(n, f) for n, f in d.params.items()],
        "steps": steps,
        "other": extra,
        "products": {k: p.model_dump(mode="json", exclude_none=True) for k, p in inst.products.items()},
    }
