"""SOP versions without the engine: establish, drafts, refusals, diff, editor validation,
periodic review, export and import (flows.services.versions, flows.services.transfer, flows.record.versions, flows.sop.diff)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select
from typer.testing import CliRunner

from flows.config import get_settings
from flows.errors import (
    ChangeControlError,
    NotAuthorizedError,
    SopDefinitionError,
    SopNotEffectiveError,
)
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import AuditEvent, Reminder, SopVersion, utcnow
from flows.record.versions import append_version_event, effective_sop, versions_of
from flows.services.drafts import create_draft
from flows.services.guard import Officer
from flows.services.sweeps import sweep
from flows.services.transfer import export_institution, import_institution
from flows.services.versions import establish, record_review
from flows.sop.catalog import Catalog
from flows.sop.editing import schema_field_names, validate_sop_text
from tests.conftest import DEMO_SOP, PASSWORD, REPO

INST = "demo_hospital"
# The demo institution's SOP files: establish makes each of them (and the built-in change control) Effective.
DEMO_SOPS = {p.stem for p in (REPO / "sops" / INST).glob("*.yaml")} - {"institution", "products"}


def _settings(db_url: str, tmp_path: Path):
    return dataclasses.replace(get_settings(), database_url=db_url, notify_config=tmp_path / "no-channels.yaml")


def _staff(settings) -> None:
    """qa (role qa), adm (sop_admin) and tech (cell_lab), written as users.add_user does, with one
    argon2 hash per test session (``conftest._password_hash``): hashing is the slow part."""
    from flows.record import ledger
    from flows.record import users as user_store
    from flows.record.tables import User
    from tests.conftest import FIXED_AT, _password_hash

    init_db(settings.database_url)
    with write_session(settings.database_url) as s:
        for username, name, role in (
            ("qa", "Wang Fang", "qa"),
            ("adm", "Zhou Admin", "sop_admin"),
            ("tech", "Li Wei", "cell_lab"),
        ):
            user = User(
                username=username,
                printed_name=name,
                password_hash=_password_hash(),
                created_at=FIXED_AT,
                created_by="test",
            )
            ledger.append(s, user, actor="test", action="user.create")
            user_store.grant_role(s, user, INST, role, actor="test")


def _events(settings, action: str) -> list[AuditEvent]:
    with read_session(settings.database_url) as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.seq))))


def _v2(tmp_path: Path, *, limit: str = "max: 30", role: str = "qa", step: bool = True) -> Path:
    """dose_receipt v2: a limit, a role and an added step changed (as asked)."""
    text = DEMO_SOP.read_text(encoding="utf-8").replace("\nversion: 1\n", "\nversion: 2\n")
    text = text.replace("min: -200, max: 40", f"min: -200, {limit}")
    text = text.replace("    role: pharmacist\n", f"    role: {role}\n")
    if step:
        text = text.replace(
            "  - id: receipt_record\n",
            "  - id: transit_time\n    kind: check\n"
            '    expect: "arrival.transit_hours <= 48"\n  - id: receipt_record\n',
        )
    path = tmp_path / "dose_receipt.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_start_without_effective_version_is_refused_with_audit_event(db_url, tmp_path):
    from flows.services import runs as runs_service

    settings = _settings(db_url, tmp_path)
    _staff(settings)
    with pytest.raises(SopNotEffectiveError, match="has no Effective version") as info:
        runs_service.start_run(settings, INST, "dose_receipt", {}, "tech", PASSWORD)
    assert "sopflow sop establish demo_hospital" in str(info.value)
    [event] = _events(settings, "run.start.refused")
    assert "no Effective version" in (event.reason or "")
    with read_session(settings.database_url) as s:
        assert s.exec(select(SopVersion)).first() is None  # nothing stored behind the refusal


def test_establish_makes_files_effective_signed_initial_issue_once(db_url, tmp_path):
    settings = _settings(db_url, tmp_path)
    _staff(settings)
    with pytest.raises(NotAuthorizedError, match="role 'qa'"):
        establish(settings, INST, Officer("adm", PASSWORD))
    assert _events(settings, "sop.establish.refused")
    rows = establish(settings, INST, Officer("qa", PASSWORD))
    assert {r["sop_id"] for r in rows} == DEMO_SOPS | {"change_control"}
    with read_session(settings.database_url) as s:
        infos = {i.version.sop_id: i for i in versions_of(s, INST)}
    assert infos["dose_receipt"].state == "effective"
    assert infos["dose_receipt"].version.text == DEMO_SOP.read_text(encoding="utf-8")
    pinned = effective_sop(settings, INST, "dose_receipt")
    assert pinned.definition.version == 1
    with pytest.raises(ChangeControlError, match="only for an installation's first versions"):
        establish(settings, INST, Officer("qa", PASSWORD))


def test_draft_by_non_administrator_is_refused_with_audit_event(db_url, tmp_path):
    settings = _settings(db_url, tmp_path)
    _staff(settings)
    establish(settings, INST, Officer("qa", PASSWORD))
    text = _v2(tmp_path).read_text(encoding="utf-8")
    with pytest.raises(
        NotAuthorizedError, match="may not create SOP drafts at 'demo_hospital': that takes role 'sop_admin'"
    ):
        create_draft(settings, INST, text, name="dose_receipt.yaml", username="tech", password=PASSWORD)
    [event] = _events(settings, "sop.draft.refused")
    assert event.object_id == f"{INST}/dose_receipt"
    res = create_draft(
        settings, INST, text, name="dose_receipt.yaml", username="adm", password=PASSWORD, reason="tighter limit"
    )
    assert res["version"] == 2
    with read_session(settings.database_url) as s:
        states = {i.version.version: i.state for i in versions_of(s, INST, "dose_receipt")}
    assert states == {1: "effective", 2: "draft"}
    # Runs still start on v1; a number is never used twice.
    assert effective_sop(settings, INST, "dose_receipt").definition.version == 1
    with pytest.raises(ChangeControlError, match="version numbers are never reused and v2 exists; set version: 3"):
        create_draft(
            settings,
            INST,
            text.replace("max: 30", "max: 20"),
            name="dose_receipt.yaml",
            username="adm",
            password=PASSWORD,
        )


def test_draft_with_problems_is_refused_with_the_validate_messages(tmp_path):
    settings = _settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path)
    text = _v2(tmp_path).read_text(encoding="utf-8").replace("    role: qa\n", "    role: qa_officer\n")
    with pytest.raises(SopDefinitionError) as info:
        create_draft(settings, INST, text, name="dose_receipt.yaml", username="adm", password=PASSWORD)
    # The same lines `sopflow sop validate` prints for the same file.
    folder = tmp_path / "sops" / INST
    shutil.copytree(REPO / "sops" / INST, folder)
    (folder / "dose_receipt.yaml").write_text(text, encoding="utf-8")
    expected = [
        p.message for p in Catalog(tmp_path / "sops", REPO / "templates").validate(folder / "dose_receipt.yaml")
    ]
    assert [p.message for p in info.value.problems] == expected
    assert "unknown role 'qa_officer'" in expected[0]


def test_validate_sop_text_gives_lines_and_schema_names():
    text = DEMO_SOP.read_text(encoding="utf-8")
    assert validate_sop_text(text) == []
    broken = text.replace("    role: pharmacist\n", "    rol: pharmacist\n").replace("max: 40", "max: hot")
    problems = validate_sop_text(broken, name="dose_receipt.yaml")
    lines = broken.splitlines()
    assert {(p["path"], p["message"]) for p in problems} >= {
        ("steps[2].rol", "unknown key 'rol'. Did you mean 'role'?"),
        ("steps[0].fields.logger_max_c.max", "expected a number, got string 'hot'"),
    }
    for p in problems:
        assert p["text"].startswith(f"dose_receipt.yaml:{p['line']}: ")
    rol = next(p for p in problems if p["path"] == "steps[2].rol")
    assert lines[rol["line"] - 1].strip() == "rol: pharmacist"
    names = schema_field_names()
    assert "steps" in names["sop"]
    assert "expect" in names["step.check"]
    assert "unit" in names["field"]


def test_check_draft_text_uses_the_institution_roles(tmp_path):
    from flows.services.drafts import check_draft_text

    settings = _settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path)
    text = _v2(tmp_path, role="qa_officer").read_text(encoding="utf-8")
    out = check_draft_text(settings, INST, text, name="dose_receipt.yaml", sop_id="dose_receipt")
    [problem] = out["problems"]
    assert problem["path"] == "steps[2].role"
    assert problem["message"].startswith("unknown role 'qa_officer'")
    assert text.splitlines()[problem["line"] - 1].strip() == "role: qa_officer"
    assert "role" in out["fields"]["step.verify"]


def test_sop_diff_names_the_limit_the_role_and_the_added_step_and_nothing_else(tmp_path, monkeypatch):
    from flows.cli import app

    db_url = f"sqlite:///{tmp_path / 'sopflow.db'}"
    settings = _settings(db_url, tmp_path)
    _staff(settings)
    establish(settings, INST, Officer("qa", PASSWORD))
    path = _v2(tmp_path)
    create_draft(settings, INST, path.read_text(encoding="utf-8"), name=str(path), username="adm", password=PASSWORD)
    monkeypatch.setenv("SOPFLOW_DATABASE_URL", db_url)
    result = CliRunner().invoke(app, ["sop", "diff", "dose_receipt", "1", "2", "--institution", INST])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "demo_hospital/dose_receipt v1 → v2: 3 changes"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "step 'arrival', field 'logger_max_c', max: 40 → 30",
            "step 'identity_verification', role: 'pharmacist' → 'qa'",
            "step 'transit_time' added (check, at position 6)",
        ]
    )


def test_periodic_review_reminder_once_then_review_recorded(tmp_path):
    settings = _settings(f"sqlite:///{tmp_path / 'sopflow.db'}", tmp_path)
    _staff(settings)
    establish(settings, INST, Officer("qa", PASSWORD))
    with read_session(settings.database_url) as s:
        info = next(i for i in versions_of(s, INST, "dose_receipt"))
    due = info.data["review_due"]
    from datetime import datetime

    soon = datetime.fromisoformat(due) - timedelta(days=10)
    assert sweep(settings, now=soon - timedelta(days=60))["review_reminders"] == 0
    assert (
        sweep(settings, now=soon)["review_reminders"] == len(DEMO_SOPS) + 1
    )  # each SOP and the built-in change control
    assert sweep(settings, now=soon)["review_reminders"] == 0  # once
    with pytest.raises(NotAuthorizedError):
        record_review(settings, INST, "dose_receipt", Officer("adm", PASSWORD), note="no change")
    res = record_review(
        settings,
        INST,
        "dose_receipt",
        Officer("qa", PASSWORD),
        note="checked against the 2026 label: no change",
        now=soon,
    )
    assert res["review_due"] > due
    with read_session(settings.database_url) as s:
        info = next(i for i in versions_of(s, INST, "dose_receipt"))
        assert s.exec(select(Reminder).where(Reminder.kind == "review_due")).all()
    assert info.state == "effective"
    assert info.data["periodic_review"] is True


def test_export_then_import_arrives_as_drafts_and_a_changed_file_is_refused(tmp_path):
    src = _settings(f"sqlite:///{tmp_path / 'test.db'}", tmp_path)
    _staff(src)
    establish(src, INST, Officer("qa", PASSWORD))
    out = tmp_path / "export"
    manifest = export_institution(src, INST, out)
    assert set(manifest["files"]) == {"institution.yaml", "products.yaml"} | {f"{sop}.yaml" for sop in DEMO_SOPS}
    assert json.loads((out / "manifest.json").read_text())["files"]["dose_receipt.yaml"]["version"] == 1

    prod = _settings(f"sqlite:///{tmp_path / 'prod.db'}", tmp_path)
    _staff(prod)
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    (tampered / "dose_receipt.yaml").write_text((out / "dose_receipt.yaml").read_text().replace("max: 40", "max: 45"))
    with pytest.raises(ChangeControlError, match=r"dose_receipt.yaml: sha256 .* differs from the manifest"):
        import_institution(prod, tampered, username="adm", password=PASSWORD)
    with pytest.raises(NotAuthorizedError):
        import_institution(prod, out, username="tech", password=PASSWORD)
    res = import_institution(prod, out, username="adm", password=PASSWORD)
    assert {(d["sop_id"], d["version"]) for d in res["drafts"]} == {(sop, 1) for sop in DEMO_SOPS}
    with read_session(prod.database_url) as s:
        assert {(i.version.sop_id, i.state) for i in versions_of(s, INST)} == {(sop, "draft") for sop in DEMO_SOPS}
    with pytest.raises(SopNotEffectiveError):  # a draft still goes through change control
        effective_sop(prod, INST, "dose_receipt")


def _established_with_v2_draft(tmp_path: Path, db_url: str = ""):
    """A fresh database (``db_url``, or SQLite in ``tmp_path``): the demo institution established,
    and dose_receipt v2 stored as a draft."""
    settings = _settings(db_url or f"sqlite:///{tmp_path / 'sopflow.db'}", tmp_path)
    _staff(settings)
    establish(settings, INST, Officer("qa", PASSWORD))
    path = _v2(tmp_path)
    create_draft(settings, INST, path.read_text(encoding="utf-8"), name=str(path), username="adm", password=PASSWORD)
    return settings


def _train_on_v2(settings) -> None:
    """Enough people trained on dose_receipt v2 for it to become effective: a pharmacist added,
    and tech, pharm and qa trained."""
    from tests.seed import seed_training, seed_user

    seed_user(settings, "pharm", "Sun Pharm", PASSWORD, [(INST, "pharmacist")])
    for user in ("tech", "pharm", "qa"):
        seed_training(settings, user, INST, "dose_receipt", 2)


def test_activate_due_supersedes_the_previous_version(tmp_path):
    from flows.record.versions import activate_due, effective_version

    settings = _established_with_v2_draft(tmp_path)
    now = utcnow()
    with write_session(settings.database_url) as s:
        v2 = s.exec(select(SopVersion).where(SopVersion.version == 2)).one()
        append_version_event(
            s, v2, "issued", actor="system", data={"effective_at": (now + timedelta(days=1)).isoformat()}
        )
        assert activate_due(s, now) == []
        waiting: dict[str, str] = {}
        assert activate_due(s, now + timedelta(days=1), waiting=waiting) == []  # nobody is trained on v2 (issue 15)
        assert "(trained/needed: cell_lab: 0/1, qa: 0/1)" in waiting[v2.id]
    _train_on_v2(settings)
    with write_session(settings.database_url) as s:
        v2 = s.exec(select(SopVersion).where(SopVersion.version == 2)).one()
        assert [v.version for v in activate_due(s, now + timedelta(days=1))] == [2]
        assert effective_version(s, INST, "dose_receipt").version == 2
        assert {i.version.version: i.state for i in versions_of(s, INST, "dose_receipt")} == {
            1: "superseded",
            2: "effective",
        }


def test_a_sweep_with_nothing_due_leaves_the_write_lock_alone_and_one_with_a_due_version_takes_it(db_url, tmp_path):
    """The executor sweeps every 5 s: a sweep that only finds nothing to conclude or make effective
    must not wait for (or hold) the lock every signer's write takes."""
    import threading

    settings = _established_with_v2_draft(tmp_path, db_url)
    _train_on_v2(settings)
    now = utcnow()
    with write_session(settings.database_url) as s:
        v2 = s.exec(select(SopVersion).where(SopVersion.version == 2)).one()
        append_version_event(
            s, v2, "issued", actor="system", data={"effective_at": (now + timedelta(days=1)).isoformat()}
        )

    def sweep_while_a_writer_holds_the_lock(at, wait: float):
        """Sweep at ``at`` while another thread holds the write lock until the sweep ends or ``wait``
        seconds pass; whether the sweep ended while the lock was still held."""
        holding, release, released, done = threading.Event(), threading.Event(), threading.Event(), {}

        def writer() -> None:
            try:
                with write_session(settings.database_url):
                    holding.set()
                    release.wait(120)  # longer than any wait below: only ``release`` ends it
            finally:
                released.set()

        def sweeper() -> None:
            try:
                done["counts"] = sweep(settings, now=at)
                done["while_held"] = not released.is_set()
            except Exception as exc:  # shown in the test's thread, not lost in this one
                done["error"] = exc

        held = threading.Thread(target=writer)
        held.start()
        assert holding.wait(20)
        swept = threading.Thread(target=sweeper)
        swept.start()
        swept.join(wait)
        release.set()
        swept.join(60)
        held.join(20)
        if "error" in done:
            raise done["error"]
        return done

    idle = sweep_while_a_writer_holds_the_lock(now, 30)  # v2 is issued, its day not come: nothing to write
    assert idle["while_held"] is True
    assert idle["counts"]["effective"] == 0
    due = sweep_while_a_writer_holds_the_lock(now + timedelta(days=1), 3)  # it is: the sweep waits its turn
    assert due["while_held"] is False
    assert due["counts"]["effective"] == 1
    with read_session(settings.database_url) as s:
        assert {i.version.version: i.state for i in versions_of(s, INST, "dose_receipt")} == {
            1: "superseded",
            2: "effective",
        }


def test_issued_version_assigns_training_and_overdue_training_is_listed_and_notified_once(tmp_path):
    from flows.record.versions import version_definition
    from flows.services.sweeps import _assign_training
    from flows.services.training import grant_training, overdue_training

    settings = _established_with_v2_draft(tmp_path)
    now = utcnow()
    with write_session(settings.database_url) as s:
        v2 = s.exec(select(SopVersion).where(SopVersion.version == 2)).one()
        assert (
            _assign_training(s, v2, version_definition(v2), now + timedelta(days=14), now) == 2
        )  # tech (cell_lab), qa
    assert overdue_training(settings, now=now + timedelta(days=13)) == []
    late = now + timedelta(days=15)
    assert {(o["username"], o["sop_version"]) for o in overdue_training(settings, now=late)} == {("tech", 2), ("qa", 2)}
    grant_training(settings, "tech", INST, "dose_receipt", 2, trainer="Trainer", officer=Officer("qa", PASSWORD))
    assert [o["username"] for o in overdue_training(settings, now=late)] == ["qa"]
    assert sweep(settings, now=late)["training_reminders"] == 1
    assert sweep(settings, now=late)["training_reminders"] == 0


def test_cli_draft_versions_export_import_and_overdue(tmp_path, monkeypatch):
    from flows.cli import app

    db_url = f"sqlite:///{tmp_path / 'sopflow.db'}"
    settings = _settings(db_url, tmp_path)
    _staff(settings)
    monkeypatch.setenv("SOPFLOW_DATABASE_URL", db_url)
    monkeypatch.setenv("SOPFLOW_PASSWORD", PASSWORD)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, result.output
        return result.output

    assert "established demo_hospital/dose_receipt v1" in run("sop", "establish", INST, "--as", "qa")
    path = _v2(tmp_path)
    out = run("sop", "draft", str(path), "--institution", INST, "--as", "tech", code=1)
    assert "that takes role 'sop_admin'" in out
    assert "draft demo_hospital/dose_receipt v2 stored" in run(
        "sop", "draft", str(path), "--institution", INST, "--as", "adm", "--reason", "tighter limit"
    )
    out = run("sop", "versions", "dose_receipt", "--institution", INST)
    assert "dose_receipt v1  effective" in out
    assert "signed by Wang Fang (initial issue)" in out
    assert "dose_receipt v2  draft" in out
    out = run("start", "change_control", "--institution", INST, "--as", "adm", code=1)
    assert "runs on a draft, started by `sopflow sop submit`" in out
    assert "no overdue training" in run("training", "overdue")
    assert f"exported {len(DEMO_SOPS) + 2} files" in run("sop", "export", INST, str(tmp_path / "out"))
    out = run("sop", "import", str(tmp_path / "out"), "--as", "adm", code=1)
    assert "version numbers are never reused" in out


def test_establish_adopts_a_version_a_run_stored_before_versions_had_states(db_url, tmp_path):
    from flows.record import ledger

    settings = _settings(db_url, tmp_path)
    _staff(settings)
    text = DEMO_SOP.read_text(encoding="utf-8")
    with write_session(settings.database_url) as s:  # as start_run stored it before change control
        old = SopVersion(
            institution=INST,
            sop_id="dose_receipt",
            version=1,
            schema_version=1,
            sha256=ledger.sha256_hex(DEMO_SOP.read_bytes()),
            text=text,
            stored_at=utcnow(),
        )
        ledger.append(s, old, actor="system", action="sop_version.store")
        old_id = old.id
    rows = establish(settings, INST, Officer("qa", PASSWORD))
    assert next(r for r in rows if r["sop_id"] == "dose_receipt")["version_id"] == old_id
    assert effective_sop(settings, INST, "dose_receipt").version_id == old_id
