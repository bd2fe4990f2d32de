"""Setting up an installation (issue 13): ``sopflow init`` scaffolds an institution folder that
validates (and leaves nothing when it cannot); the installation administrator (the key file)
sets up an institution with its first QA officer, audited, once; every refusal is audited; and a
QA officer grants and revokes roles, a revocation being a row of its own that every rule reads.
On SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from sqlmodel import col, select

from flows.config import Settings, get_settings
from flows.errors import AuthenticationError, NotAuthorizedError, RecordError
from flows.record.db import read_session
from flows.record.tables import AuditEvent, RoleGrant, RoleRevocation
from flows.record.users import roles_of
from flows.services import accounts, institutions, roles
from flows.services.audit import verify_audit
from flows.services.guard import ADMIN, UNAUTHENTICATED, Officer

REPO = Path(__file__).resolve().parents[1]
PW = "officer pw 123"


@pytest.fixture(name="site")
def site_fixture(db_url: str, tmp_path: Path) -> Settings:
    """An installation with two institution folders of its own (city_hospital from the English
    example, river_clinic from the Chinese one) and no account yet."""
    sops = tmp_path / "sops"
    sops.mkdir()
    settings = replace(
        get_settings(), home=tmp_path, database_url=db_url, sops_dir=sops, admin_key_file=tmp_path / "admin.key"
    )
    institutions.scaffold_institution(settings, sops / "city_hospital", name="City Hospital", timezone="Europe/Berlin")
    institutions.scaffold_institution(settings, sops / "river_clinic", name="河畔诊所", language="zh")
    return settings


def _events(settings: Settings, after: int = 0) -> list[AuditEvent]:
    with read_session(settings.database_url) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.seq > after).order_by(col(AuditEvent.seq))))


def _head(settings: Settings) -> int:
    events = _events(settings)
    return events[-1].seq if events else 0


def test_init_scaffolds_a_folder_that_validates(tmp_path: Path):
    settings = replace(get_settings(), sops_dir=tmp_path)
    res = institutions.scaffold_institution(
        settings, tmp_path / "north_ward", name='North "Ward" 北院', timezone="America/New_York"
    )

    from flows.sop.catalog import Catalog

    inst = Catalog(tmp_path, settings.templates_dir).institution("north_ward")
    assert inst.spec.name == 'North "Ward" 北院'
    assert inst.spec.timezone == "America/New_York"
    assert "dose_receipt" in res["sops"]
    assert len(res["sops"]) == len(list((REPO / "sops" / "demo_hospital").glob("*.yaml"))) - 2
    head = (tmp_path / "north_ward" / "dose_receipt.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert head.startswith('# Owner: North "Ward" 北院 · Approval: (to assign before establish)')
    assert "Demo Hospital" not in (tmp_path / "north_ward" / "institution.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("folder", "kwargs", "message"),
    [
        ("north_ward", {"timezone": "Mars/Base"}, "--timezone: 'Mars/Base' is not an IANA time zone"),
        ("North-Ward", {}, "its name is the institution id and must match"),
        ("north_ward", {"language": "fr"}, "--language: expected one of en, zh, got 'fr'"),
        ("north_ward", {"source": "nowhere"}, "no institution 'nowhere'"),
    ],
)
def test_init_refuses_bad_input_and_writes_nothing(tmp_path: Path, folder: str, kwargs: dict, message: str):
    settings = replace(get_settings(), sops_dir=tmp_path)
    with pytest.raises(Exception, match=message):
        institutions.scaffold_institution(settings, tmp_path / folder, name="North", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_a_folder_with_files(tmp_path: Path):
    (tmp_path / "north_ward").mkdir()
    (tmp_path / "north_ward" / "notes.txt").write_text("mine")
    with pytest.raises(RecordError, match="exists and is not empty"):
        institutions.scaffold_institution(get_settings(), tmp_path / "north_ward", name="North")
    assert [p.name for p in (tmp_path / "north_ward").iterdir()] == ["notes.txt"]


def test_admin_key_is_created_once_readable_by_its_owner_only(site: Settings):
    path = institutions.init_admin_key(site)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    created = [e for e in _events(site) if e.action == "admin.key.create"]
    assert [e.actor for e in created] == [ADMIN]
    assert path.read_text().strip() not in json.dumps([e.payload_json for e in _events(site)])
    head = _head(site)
    with pytest.raises(NotAuthorizedError, match="registered already"):
        institutions.init_admin_key(site)
    assert [(e.actor, e.action) for e in _events(site, head)] == [(UNAUTHENTICATED, "admin.init.refused")]


def _refused_without_admin(site: Settings, message: str) -> None:
    head = _head(site)
    with pytest.raises(NotAuthorizedError, match=message):
        institutions.add_institution(site, "city_hospital", "anna", "Anna Berg", PW)
    assert [(e.actor, e.action, e.object_id) for e in _events(site, head)] == [
        (UNAUTHENTICATED, "institution.add.refused", "city_hospital")
    ]
    assert not accounts.has_users(site)


def test_institution_add_refuses_without_the_administrators_key(site: Settings):
    _refused_without_admin(site, "no installation administrator's key at")
    institutions.init_admin_key(site)
    key = site.admin_key_path.read_text()
    os.chmod(site.admin_key_path, 0o644)
    _refused_without_admin(site, "may be read by other users")
    os.chmod(site.admin_key_path, 0o600)
    site.admin_key_path.write_text("not-the-key\n")
    _refused_without_admin(site, "is not the installation administrator's key in force")
    site.admin_key_path.write_text(key)
    institutions.add_institution(site, "city_hospital", "anna", "Anna Berg", PW)
    assert accounts.user_summary(site, "anna")["roles"] == {"city_hospital": ["qa"]}


def test_institution_add_sets_up_a_second_institution_with_its_first_qa_officer(site: Settings):
    accounts.add_user(site, "boot", "Boot Strap", PW, [("city_hospital", "qa")])  # the bootstrap account
    institutions.init_admin_key(site)
    head = _head(site)

    res = institutions.add_institution(site, "river_clinic", "lin.qa", "Lin Qiao 林巧", PW)

    assert res.created_user
    events = _events(site, head)
    assert {e.actor for e in events} == {ADMIN}
    assert [e.action for e in events] == ["user.create", "role.grant", "institution.add"]
    payload = json.loads(events[-1].payload_json)["row"]
    assert payload["institution"] == "river_clinic"
    assert payload["os_user"]
    assert payload["host"]
    # The new QA officer adds staff at their institution, and only there.
    lin = Officer("lin.qa", PW)
    accounts.add_user(site, "wu", "Wu Fei", PW, [("river_clinic", "pharmacist")], officer=lin)
    with pytest.raises(NotAuthorizedError, match="'city_hospital'"):
        accounts.add_user(site, "zed", "Zed", PW, [("city_hospital", "pharmacist")], officer=lin)
    # Once set up, the administrator cannot add another officer there (its QA officers do), audited.
    head = _head(site)
    with pytest.raises(NotAuthorizedError, match="set up already"):
        institutions.add_institution(site, "river_clinic", "boot", None, None)
    with pytest.raises(NotAuthorizedError, match="has staff already"):
        institutions.add_institution(site, "city_hospital", "lin.qa", None, None)
    assert [(e.actor, e.action) for e in _events(site, head)] == [(ADMIN, "institution.add.refused")] * 2
    assert verify_audit(site).ok


def test_institution_add_gives_an_existing_account_the_qa_role(site: Settings):
    accounts.add_user(site, "boot", "Boot Strap", PW, [("city_hospital", "qa")])
    institutions.init_admin_key(site)
    res = institutions.add_institution(site, "river_clinic", "boot", None, None)
    assert not res.created_user
    assert accounts.user_summary(site, "boot")["roles"] == {"city_hospital": ["qa"], "river_clinic": ["qa"]}
    rows = institutions.list_institutions(site)
    assert [(r["id"], r["qa_officers"], r["set_up_by"], r["valid"]) for r in rows] == [
        ("city_hospital", 1, "bootstrap or earlier", True),
        ("river_clinic", 1, "admin", True),
    ]


def test_institution_add_refuses_an_institution_without_a_folder_or_qa_role(site: Settings):
    institutions.init_admin_key(site)
    with pytest.raises(Exception, match="no institution 'lake_clinic'"):
        institutions.add_institution(site, "lake_clinic", "anna", "Anna", PW)
    (site.sops_dir / "lake_clinic").mkdir()  # an institution (no SOPs yet) whose roles have no 'qa'
    text = (site.sops_dir / "city_hospital" / "institution.yaml").read_text()
    text = text.replace("id: city_hospital", "id: lake_clinic")
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("  qa:"))
    (site.sops_dir / "lake_clinic" / "institution.yaml").write_text(text)
    with pytest.raises(RecordError, match="has no role 'qa'"):
        institutions.add_institution(site, "lake_clinic", "anna", "Anna", PW)
    assert not accounts.has_users(site)


@pytest.fixture(name="staffed")
def staffed_fixture(site: Settings) -> Settings:
    """city_hospital: qa.one (bootstrap, qa), qa.two (qa), ana (cell_lab). river_clinic: lin.qa (qa)."""
    accounts.add_user(site, "qa.one", "Qa One", PW, [("city_hospital", "qa")])
    one = Officer("qa.one", PW)
    accounts.add_user(site, "qa.two", "Qa Two", PW, [("city_hospital", "qa")], officer=one)
    accounts.add_user(site, "ana", "Ana Li", PW, [("city_hospital", "cell_lab")], officer=one)
    institutions.init_admin_key(site)
    institutions.add_institution(site, "river_clinic", "lin.qa", "Lin Qiao", PW)
    return site


def _roles(settings: Settings, username: str, institution: str) -> set[str]:
    with read_session(settings.database_url) as s:
        user_id = accounts.guard.target_user(s, username).id
        return roles_of(s, user_id, institution)


def test_role_grant_and_revoke_by_a_qa_officer_leave_every_row(staffed: Settings):
    one = Officer("qa.one", PW)
    roles.grant(staffed, "ana", "city_hospital", "pharmacist", one)
    assert _roles(staffed, "ana", "city_hospital") == {"cell_lab", "pharmacist"}

    roles.revoke(staffed, "ana", "city_hospital", "pharmacist", one, "moved to the ward")

    assert _roles(staffed, "ana", "city_hospital") == {"cell_lab"}
    with read_session(staffed.database_url) as s:
        grants = list(s.exec(select(RoleGrant).where(RoleGrant.role == "pharmacist")))
        revocations = list(s.exec(select(RoleRevocation)))
    assert len(grants) == 1
    assert [r.grant_id for r in revocations] == [grants[0].id]
    assert revocations[0].reason == "moved to the ward"
    assert accounts.user_summary(staffed, "ana")["roles"] == {"city_hospital": ["cell_lab"]}
    # Given again: a new grant; the first one and its revocation stay.
    roles.grant(staffed, "ana", "city_hospital", "pharmacist", one)
    assert _roles(staffed, "ana", "city_hospital") == {"cell_lab", "pharmacist"}
    with read_session(staffed.database_url) as s:
        assert len(list(s.exec(select(RoleGrant).where(RoleGrant.role == "pharmacist")))) == 2
    assert verify_audit(staffed).ok


def test_a_revoked_qa_role_no_longer_adds_users(staffed: Settings):
    roles.revoke(staffed, "qa.two", "city_hospital", "qa", Officer("qa.one", PW), "left the unit")
    with pytest.raises(NotAuthorizedError, match="that takes role 'qa' there"):
        accounts.add_user(staffed, "bo", "Bo", PW, [("city_hospital", "cell_lab")], officer=Officer("qa.two", PW))


@pytest.mark.parametrize(
    ("officer", "call", "error", "message", "action"),
    [
        (
            "lin.qa",
            ("grant", "ana", "city_hospital", "pharmacist"),
            NotAuthorizedError,
            "'city_hospital'",
            "role.grant",
        ),
        ("ana", ("grant", "ana", "city_hospital", "pharmacist"), NotAuthorizedError, "takes role 'qa'", "role.grant"),
        (
            "qa.one",
            ("grant", "qa.one", "city_hospital", "cell_lab"),
            NotAuthorizedError,
            "their own account",
            "role.grant",
        ),
        ("qa.one", ("revoke", "qa.one", "city_hospital", "qa"), NotAuthorizedError, "their own account", "role.revoke"),
        (
            "lin.qa",
            ("revoke", "ana", "city_hospital", "cell_lab"),
            NotAuthorizedError,
            "'city_hospital'",
            "role.revoke",
        ),
    ],
)
def test_role_changes_by_the_wrong_person_are_refused_and_audited(
    staffed: Settings, officer: str, call: tuple, error: type, message: str, action: str
):
    verb, username, institution, role = call
    head = _head(staffed)
    args = (staffed, username, institution, role, Officer(officer, PW))
    with pytest.raises(error, match=message):
        roles.grant(*args) if verb == "grant" else roles.revoke(*args, "a reason")
    refused = [e for e in _events(staffed, head) if e.action.endswith(".refused")]
    assert [(e.action, e.object_id) for e in refused] == [(f"{action}.refused", username)]
    assert not any(e.action in ("role.grant", "role.revoke") for e in _events(staffed, head))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (("grant", "ana", "city_hospital", "pharmacst"), "has no role 'pharmacst'. Did you mean 'pharmacist'"),
        (("grant", "ana", "city_hospital", "cell_lab"), "holds city_hospital:cell_lab already"),
        (("revoke", "ana", "city_hospital", "pharmacist"), "does not hold city_hospital:pharmacist"),
        (("revoke", "ana", "city_hospital", "cell_lab", "  "), "--reason: a revocation needs a reason"),
    ],
)
def test_role_changes_that_make_no_sense_are_refused_and_change_nothing(staffed: Settings, call: tuple, message: str):
    roles_before = {u: accounts.user_summary(staffed, u)["roles"] for u in ("ana", "qa.one")}
    verb, username, institution, role, *reason = call
    officer = Officer("qa.one", PW)
    if verb == "grant":
        with pytest.raises(RecordError, match=message):
            roles.grant(staffed, username, institution, role, officer)
    else:
        with pytest.raises(RecordError, match=message):
            roles.revoke(staffed, username, institution, role, officer, reason[0] if reason else "a reason")
    assert {u: accounts.user_summary(staffed, u)["roles"] for u in ("ana", "qa.one")} == roles_before


def test_role_change_with_a_wrong_password_is_refused(staffed: Settings):
    with pytest.raises(AuthenticationError):
        roles.grant(staffed, "ana", "city_hospital", "pharmacist", Officer("qa.one", "wrong password"))
    assert _roles(staffed, "ana", "city_hospital") == {"cell_lab"}
