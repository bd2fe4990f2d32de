"""The service layer, continued: the SOP library as people see it (the web's SOP pages and start form).

- ``startable_sops``: the SOPs a user may start, with their parameters and the products.
- ``sop_library``: per institution, SOP versions with state and sha256.
- ``describe_sop``: one SOP as plain data, every key the file gives (new SOP keys show up as they are).

Same rules as ``flows.service``: no business rule in a page.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import SopDefinitionError, SopNotFoundError
from flows.record.db import init_db, read_session
from flows.record.tables import SopVersion
from flows.service_web import _field_view, user_summary

__all__ = ["describe_sop", "sop_library", "startable_sops"]


def startable_sops(settings: Settings, username: str) -> list[dict[str, Any]]:
    """The SOPs this user may start (an Effective version at an institution where they hold a role
    that ``start_roles`` admits), with params and products; an institution whose files are broken is
    listed with its problems."""
    from flows.changes.control import effective_sop
    from flows.errors import FlowsError
    from flows.sop.catalog import Catalog

    mine = user_summary(settings, username)["roles"]
    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    out = []
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
            if d.start_roles and not set(d.start_roles) & set(mine[inst_id]):
                continue
            out.append(
                {
                    "institution": inst_id,
                    "sop_id": sop_id,
                    "title": d.title,
                    "version": d.version,
                    "sha256": pinned.sha256,
                    "params": [_field_view(n, f) for n, f in d.params.items()],
                    "products": products,
                    "problems": [],
                }
            )
    return out


def sop_library(settings: Settings) -> list[dict[str, Any]]:
    """Per institution, its SOPs with version, state and sha256: the versions change control
    records, with their states (``effective``, ``draft``, …); for an institution with no version yet
    (not established), the files and the revisions runs used (``superseded`` when the file has
    changed since)."""
    from flows.changes.control import list_versions
    from flows.sop.catalog import Catalog

    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        stored = list(s.exec(select(SopVersion).order_by(col(SopVersion.stored_at))))
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
        versions = list(list_versions(settings, inst_id))
        if versions:
            entry["sops"] = [
                {
                    "id": v["sop_id"],
                    "title": titles.get(v["sop_id"]),
                    "version": v["version"],
                    "sha256": v["sha256"],
                    "state": v["state"],
                    "file": current.get(v["sop_id"]) == v["sha256"],
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
            entry["sops"] += [
                {
                    "id": v.sop_id,
                    "title": None,
                    "version": v.version,
                    "sha256": v.sha256,
                    "state": "superseded",
                    "file": False,
                }
                for v in stored
                if v.institution == inst_id and current.get(v.sop_id) != v.sha256
            ]
        out.append(entry)
    return out


def describe_sop(settings: Settings, institution: str, sop_id: str) -> dict[str, Any]:
    """One SOP in force (its Effective version; the file in ``sops/`` when none is Effective, with
    ``in_force`` False), as plain data: params, steps (every key given), roles, products.

    Raises:
        SopNotFoundError, SopDefinitionError
    """
    from flows.sop.catalog import Catalog

    catalog = Catalog(settings.sops_dir, settings.templates_dir)
    inst = catalog.institution(institution)
    if sop_id not in inst.sops:
        catalog.get_sop(institution, sop_id)  # raises SopNotFoundError with a "did you mean"
    loaded = inst.sops[sop_id]
    from flows.changes.control import effective_sop
    from flows.errors import FlowsError

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
        "params": [_field_view(n, f) for n, f in d.params.items()],
        "steps": steps,
        "other": extra,
        "products": {k: p.model_dump(mode="json", exclude_none=True) for k, p in inst.products.items()},
    }
