"""The service floor: moving SOP definitions between installations, and two versions side by side.

``export_institution`` writes a folder: ``institution.yaml`` (name, zone, roles),
``products.yaml`` (the catalogue) and one ``<sop_id>.yaml`` per Effective SOP, each the exact
stored text, plus ``manifest.json`` with every file's sha256 and the version it came from.
``import_institution`` checks every file against the manifest (a changed, missing or extra file
refuses the whole import: nothing is stored) and stores each SOP as a Draft of the target
installation, which then goes through change control like any other draft. Roles and the
product catalogue are configuration files (``sops/<institution>/``): an import reports where
they differ from the target's and leaves them to the administrator.

``diff_versions`` compares two stored versions' definitions (``flows.sop.diff``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from flows.config import Settings
from flows.errors import ChangeControlError, Problem, SopDefinitionError, SopNotFoundError
from flows.record import ledger
from flows.record.db import init_db, read_session
from flows.record.versions import CHANGE_CONTROL_ID, version_definition, versions_of
from flows.services.drafts import create_draft
from flows.services.versions import find_version
from flows.sop.catalog import INSTITUTION_FILE, PRODUCTS_FILE
from flows.sop.diff import Change, diff_sops
from flows.sop.editing import load_sop_text
from flows.sop.load import load_institution_file

__all__ = ["MANIFEST", "diff_versions", "export_institution", "import_institution"]

MANIFEST = "manifest.json"
FORMAT = "sopflow-export/1"


def diff_versions(settings: Settings, institution: str, sop_id: str, old: int, new: int) -> list[Change]:
    """What changed from version ``old`` to ``new`` of a stored SOP.

    Raises:
        SopNotFoundError: no such version.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        a = version_definition(find_version(s, institution, sop_id, old))
        b = version_definition(find_version(s, institution, sop_id, new))
    return diff_sops(a, b)


def export_institution(settings: Settings, institution: str, folder: Path) -> dict[str, Any]:
    """Write the institution's Effective SOPs, catalogue and roles with a manifest; returns the manifest.

    Raises:
        SopNotFoundError (no institution, or nothing Effective), ChangeControlError (folder not empty)
    """
    src = settings.sops_dir / institution
    if not (src / INSTITUTION_FILE).is_file():
        raise SopNotFoundError(f"no institution {institution!r} under {settings.sops_dir}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ChangeControlError(f"{folder}: not empty; export into a new or empty folder")
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        effective = [
            i for i in versions_of(s, institution) if i.state == "effective" and i.version.sop_id != CHANGE_CONTROL_ID
        ]
        rows = [(i.version.sop_id, i.version.version, i.version.text) for i in effective]
    if not rows:
        raise SopNotFoundError(f"institution {institution!r} has no Effective SOP to export")
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for name in (INSTITUTION_FILE, PRODUCTS_FILE):
        if (src / name).is_file():
            data = (src / name).read_bytes()
            (folder / name).write_bytes(data)
            files[name] = {"sha256": ledger.sha256_hex(data)}
    for sop_id, number, text in sorted(rows):
        data = text.encode("utf-8")
        (folder / f"{sop_id}.yaml").write_bytes(data)
        files[f"{sop_id}.yaml"] = {"sha256": ledger.sha256_hex(data), "sop_id": sop_id, "version": number}
    manifest = {"format": FORMAT, "institution": institution, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _checked(folder: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every file's bytes, all matching; or ChangeControlError naming each mismatch."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ChangeControlError(f"{folder / MANIFEST}: cannot read the manifest ({exc})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ChangeControlError(f"{folder / MANIFEST}: not a sopflow export manifest (format {FORMAT!r})")
    problems: list[str] = []
    contents: dict[str, bytes] = {}
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        if Path(name).name != name or not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
            continue
        data = path.read_bytes()
        if ledger.sha256_hex(data) != entry.get("sha256"):
            problems.append(
                f"{path}: sha256 {ledger.sha256_hex(data)[:12]}… differs from the manifest's "
                f"{str(entry.get('sha256'))[:12]}…: the file was changed after export"
            )
        contents[name] = data
    for path in sorted(folder.glob("*.yaml")):
        if path.name not in manifest["files"]:
            problems.append(f"{path}: not in the manifest: added after export")
    if problems:
        raise ChangeControlError("import refused, nothing stored:\n" + "\n".join(problems))
    return manifest, contents


def import_institution(
    settings: Settings, folder: Path, *, username: str, password: str, institution: str | None = None
) -> dict[str, Any]:
    """Verify an exported folder against its manifest and store its SOPs as Drafts of ``institution``
    (default: the exported one), created by ``username`` (an administrator there).

    Raises:
        ChangeControlError (hash mismatch, missing or extra file, version numbers), SopDefinitionError,
        SopNotFoundError, AuthenticationError, NotAuthorizedError
    """
    folder = Path(folder)
    manifest, contents = _checked(folder)
    target = institution or str(manifest.get("institution"))
    notes: list[str] = []
    for name in (INSTITUTION_FILE, PRODUCTS_FILE):
        if name in contents:
            here = settings.sops_dir / target / name
            if not here.is_file() or yaml.safe_load(here.read_bytes()) != yaml.safe_load(contents[name]):
                what = "roles" if name == INSTITUTION_FILE else "product catalogue"
                notes.append(
                    f"{name}: the exported {what} differs from sops/{target}/{name}; review and copy it by hand"
                )
    sops = {n: e for n, e in manifest["files"].items() if "sop_id" in e}
    _precheck(settings, target, folder, sops, contents)
    drafts = []
    for name, entry in sorted(manifest["files"].items()):
        if "sop_id" not in entry:
            continue
        drafts.append(
            create_draft(
                settings,
                target,
                contents[name].decode("utf-8"),
                name=str(folder / name),
                username=username,
                password=password,
                sop_id=entry["sop_id"],
                reason=f"imported from {manifest.get('institution')} v{entry.get('version')}",
            )
        )
    return {"institution": target, "drafts": drafts, "notes": notes}


def _precheck(settings: Settings, target: str, folder: Path, sops: dict[str, Any], contents: dict[str, bytes]) -> None:
    """Every SOP valid at the target and numbered above its versions there, before any is stored."""
    spec = load_institution_file(settings.sops_dir / target / INSTITUTION_FILE)
    problems: list[Problem] = []
    numbers = []
    for name, entry in sorted(sops.items()):
        try:
            loaded = load_sop_text(
                contents[name].decode("utf-8"),
                name=str(folder / name),
                institution=spec,
                templates_dir=settings.templates_dir,
                sop_id=entry["sop_id"],
            )
            numbers.append((name, loaded.definition.id, loaded.definition.version))
        except SopDefinitionError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SopDefinitionError(problems)
    init_db(settings.database_url)
    clashes = []
    with read_session(settings.database_url) as s:
        for name, sop_id, number in numbers:
            highest = max((i.version.version for i in versions_of(s, target, sop_id)), default=0)
            if number <= highest:
                clashes.append(
                    f"{folder / name}: {sop_id} v{number}: {target} has v{highest} already and version numbers "
                    f"are never reused; export from an installation whose version is above v{highest}"
                )
    if clashes:
        raise ChangeControlError("import refused, nothing stored:\n" + "\n".join(clashes))
