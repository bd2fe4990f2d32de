"""Training gates (21 CFR 11.10(i)): a signer must be trained on the exact SOP id and version the run
uses, at its institution; refused at submit time and again inside the flow, and audited. Training
records are validated against the SOPs that exist. Record layer on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import col, func, select

from flows.config import Settings, get_settings
from flows.errors import NotAuthorizedError, NotFoundError, RecordError, SopNotFoundError
from flows.record import ledger, state
from flows.record.db import read_session, write_session
from flows.record.tables import (
    AuditEvent,
    Signature,
    SopVersion,
    StepRecord,
    TrainingRecord,
)
from flows.record.training import is_trained, record_training
from flows.services import accounts, training
from flows.services.guard import UNAUTHENTICATED, Officer
from flows.sop.model import CheckStepSpec, HumanStepSpec
from tests.conftest import FIXED_AT, MakeRun
from tests.waiting import eventually

PW = "correct horse 7"
QA = Officer("qa.one", PW)

UNTRAINED = (
    "only staff trained on dose_receipt v1 at 'demo_hospital' may sign step {step!r}; user 'ana' is not trained "
    "on dose_receipt v1 (sopflow training grant ana --institution demo_hospital --sop dose_receipt --version 1)"
)


def test_training_signer_problem_untrained_signer(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, trained=False)
        ana = made.users["ana"]
        before = state.signer_problem(s, made.run, made.sop, made.human("arrival"), ana.id)
        # Training on another version or at another institution does not count.
        record_training(s, ana, "demo_hospital", "dose_receipt", 2, trained_at=FIXED_AT, trainer="T", actor="system")
        record_training(s, ana, "other_hospital", "dose_receipt", 1, trained_at=FIXED_AT, trainer="T", actor="system")
        record_training(s, ana, "demo_hospital", "dose_receipt_v2", 1, trained_at=FIXED_AT, trainer="T", actor="system")
        still = state.signer_problem(s, made.run, made.sop, made.human("arrival"), ana.id)
        record_training(s, ana, "demo_hospital", "dose_receipt", 1, trained_at=FIXED_AT, trainer="T", actor="system")
        after = state.signer_problem(s, made.run, made.sop, made.human("arrival"), ana.id)

    assert before == still == UNTRAINED.format(step="arrival")
    assert after is None


def test_training_role_is_checked_before_training(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, trained=False)

        problem = state.signer_problem(s, made.run, made.sop, made.human("arrival"), made.users["bo"].id)

    assert problem == "step 'arrival' may only be signed by role 'cell_lab' of 'demo_hospital'"


def test_training_disposition_step_is_part_of_the_sop(db_url: str, make_run: MakeRun) -> None:
    from flows.engine.gates import disposition_step

    with write_session(db_url) as s:
        made = make_run(s, trained=False)
        check = made.sop.step("transit_temperature")
        assert isinstance(check, CheckStepSpec)
        disposition = disposition_step(check)
        ana = made.users["ana"]  # holds qa, the disposition role

        untrained = state.signer_problem(s, made.run, made.sop, disposition, ana.id)
        record_training(s, ana, "demo_hospital", "dose_receipt", 1, trained_at=FIXED_AT, trainer="T", actor="system")
        trained = state.signer_problem(s, made.run, made.sop, disposition, ana.id)

    assert untrained == UNTRAINED.format(step="transit_temperature__disposition")
    assert trained is None


# --------------------------------------------------------------------------- granting


@pytest.fixture
def people(db_url: str) -> Settings:
    settings = replace(get_settings(), database_url=db_url)
    accounts.add_user(settings, "qa.one", "Qian An", PW, [("demo_hospital", "qa")])  # the first account
    accounts.add_user(settings, "ana", "Ana Li", PW, [("demo_hospital", "cell_lab")], officer=QA)
    return settings


def _trainings(settings: Settings) -> list[TrainingRecord]:
    with read_session(settings.database_url) as s:
        return list(s.exec(select(TrainingRecord)))


@pytest.mark.parametrize(
    ("institution", "sop", "version", "message"),
    [
        ("demo_hospitl", "dose_receipt", 1, "no institution 'demo_hospitl'. Did you mean 'demo_hospital'?"),
        ("demo_hospital", "dose_reciept", 1, "no SOP 'dose_reciept' in demo_hospital. Did you mean 'dose_receipt'?"),
        ("demo_hospital", "dose_receipt", 2, "demo_hospital/dose_receipt has no version 2; known versions: 1"),
    ],
)
def test_training_grant_refuses_an_sop_or_version_that_does_not_exist(
    people: Settings, institution: str, sop: str, version: int, message: str
) -> None:
    with pytest.raises(SopNotFoundError) as info:
        training.grant_training(people, "ana", institution, sop, version, trainer="T", officer=QA)

    assert str(info.value) == message
    assert _trainings(people) == []


def test_training_grant_accepts_a_version_only_stored_from_an_earlier_run(people: Settings) -> None:
    with write_session(people.database_url) as s:
        ledger.append(
            s,
            SopVersion(
                institution="demo_hospital",
                sop_id="dose_receipt",
                version=7,
                schema_version=1,
                sha256="0" * 64,
                text="(retired text)",
                stored_at=FIXED_AT,
            ),
            actor="system",
        )

    training.grant_training(people, "ana", "demo_hospital", "dose_receipt", 7, trainer="T", officer=QA)

    with pytest.raises(SopNotFoundError, match="known versions: 1, 7"):
        training.grant_training(people, "ana", "demo_hospital", "dose_receipt", 3, trainer="T", officer=QA)


def test_training_grant_refuses_unknown_user_and_future_or_zoneless_date(people: Settings) -> None:
    with pytest.raises(NotFoundError, match=re.escape("no user 'anna'. Did you mean 'ana'?")):
        training.grant_training(people, "anna", "demo_hospital", "dose_receipt", 1, trainer="T", officer=QA)
    tomorrow = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
    with pytest.raises(RecordError, match="is in the future"):
        training.grant_training(
            people, "ana", "demo_hospital", "dose_receipt", 1, trainer="T", trained_on=tomorrow, officer=QA
        )
    with pytest.raises(RecordError, match="needs an offset"):
        training.grant_training(
            people, "ana", "demo_hospital", "dose_receipt", 1, trainer="T", trained_on="2026-01-05T09:00", officer=QA
        )

    assert _trainings(people) == []


def test_training_grant_without_a_qa_officer_is_refused_and_audited(people: Settings) -> None:
    """Issue 10: "training is recorded by a QA officer" was a rule of the CLI only; code calling the
    service floor directly (the web, a script) is refused too, and the refusal is in the audit trail."""
    with pytest.raises(NotAuthorizedError) as info:
        training.grant_training(people, "ana", "demo_hospital", "dose_receipt", 1, trainer="Dr. Trainer", officer=None)

    assert str(info.value) == "training is recorded by a QA officer of the institution: --as QA_USER"
    assert _trainings(people) == []
    with read_session(people.database_url) as s:
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "training.grant.refused")).one()
        assert ledger.verify_chain(s).ok
    assert (refused.actor, refused.object_id, refused.reason) == (UNAUTHENTICATED, "ana", str(info.value))


def test_training_grant_by_qa_officer_with_a_date_in_the_institutions_zone(people: Settings) -> None:
    training.grant_training(
        people, "ana", "demo_hospital", "dose_receipt", 1, trainer="Dr. Trainer", trained_on="2026-01-05", officer=QA
    )

    [rec] = _trainings(people)
    assert rec.trained_at == datetime(2026, 1, 4, 16, 0, tzinfo=UTC)  # 2026-01-05 00:00 Asia/Shanghai
    with read_session(people.database_url) as s:
        officer_id = s.exec(select(AuditEvent.actor).where(AuditEvent.action == "training.grant")).one()
    assert (rec.trainer, rec.recorded_by, rec.sop_version) == ("Dr. Trainer", officer_id, 1)
    [row] = training.list_training(people, "ana")
    assert (row["username"], row["sop_id"], row["recorded_by"]) == ("ana", "dose_receipt", "qa.one")
    with read_session(people.database_url) as s:
        assert ledger.verify_chain(s).ok


def test_training_grant_by_qa_officer_and_not_by_others(people: Settings) -> None:
    with pytest.raises(NotAuthorizedError) as info:
        training.grant_training(people, "qa.one", "demo_hospital", "dose_receipt", 1, officer=Officer("ana", PW))
    training.grant_training(people, "ana", "demo_hospital", "dose_receipt", 1, officer=Officer("qa.one", PW))

    assert str(info.value) == "user 'ana' may not record training at 'demo_hospital': that takes role 'qa' there"
    [rec] = _trainings(people)
    with read_session(people.database_url) as s:
        refused = s.exec(select(AuditEvent).where(AuditEvent.action == "training.grant.refused")).one()
        officer_id = s.exec(select(AuditEvent.actor).where(AuditEvent.action == "training.grant")).one()
        assert is_trained(s, rec.user_id, "demo_hospital", "dose_receipt", 1)
    assert refused.object_id == "qa.one"
    assert (rec.trainer, rec.recorded_by) == ("Qian An", officer_id)


@pytest.mark.slow
def test_training_cli_grant_and_list(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOPFLOW_")}
    env.update(
        {"SOPFLOW_HOME": str(tmp_path / "home"), "COLUMNS": "200", "SOPFLOW_NEW_PASSWORD": PW, "SOPFLOW_PASSWORD": PW}
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flows", *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    assert cli("user", "add", "qa.one", "--name", "Qian An", "--role", "demo_hospital:qa").returncode == 0
    assert (
        cli("user", "add", "ana", "--name", "Ana Li", "--role", "demo_hospital:cell_lab", "--as", "qa.one").returncode
        == 0
    )
    unattended = cli(
        "training",
        "grant",
        "ana",
        "--institution",
        "demo_hospital",
        "--sop",
        "dose_receipt",
        "--version",
        "1",
        "--trainer",
        "T",
    )
    typo = cli(
        "training",
        "grant",
        "ana",
        "--institution",
        "demo_hospital",
        "--sop",
        "dose_reciept",
        "--version",
        "1",
        "--trainer",
        "T",
        "--as",
        "qa.one",
    )
    granted = cli(
        "training",
        "grant",
        "ana",
        "--institution",
        "demo_hospital",
        "--sop",
        "dose_receipt",
        "--version",
        "1",
        "--trainer",
        "Dr. Trainer",
        "--date",
        "2026-01-05",
        "--as",
        "qa.one",
    )
    listed = cli("training", "list", "--user", "ana")

    assert unattended.returncode == 1
    assert "training is recorded by a QA officer of the institution: --as QA_USER" in unattended.stderr
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines() == [
        "error: no SOP 'dose_reciept' in demo_hospital. Did you mean 'dose_receipt'?"
    ]
    assert granted.returncode == 0, granted.stderr
    assert "training recorded: ana on demo_hospital/dose_receipt v1" in granted.stdout
    assert (
        "ana                  demo_hospital/dose_receipt v1  trained 2026-01-04 by Dr. Trainer  (recorded by qa.one"
        in listed.stdout
    )


# --------------------------------------------------------------------------- end to end


def _counts(settings: Settings) -> tuple[int, int]:
    with read_session(settings.database_url) as s:
        return (
            s.exec(select(func.count()).select_from(StepRecord)).one(),
            s.exec(select(func.count()).select_from(Signature)).one(),
        )


@pytest.mark.slow
def test_training_untrained_signer_is_refused_at_submit_and_audited(engine: Settings) -> None:
    from flows.services import signing as signing_service
    from tests.fixtures_engine import ARRIVAL, PASSWORD, start_receipt, wait_for

    accounts.add_user(
        engine, "new.tech", "Xin Ji", PASSWORD, [("demo_hospital", "cell_lab")], officer=Officer("qa", PASSWORD)
    )
    run_id = start_receipt(engine, coi="COI-TRAIN-0001")
    wait_for(engine, run_id, step="arrival")
    before = _counts(engine)

    with pytest.raises(NotAuthorizedError) as info:
        signing_service.submit_step(engine, run_id, "arrival", "new.tech", PASSWORD, ARRIVAL)

    assert str(info.value) == (
        "user 'new.tech': only staff trained on dose_receipt v1 at 'demo_hospital' may sign step 'arrival'; user 'new.tech' "
        "is not trained on dose_receipt v1 (sopflow training grant new.tech --institution demo_hospital --sop dose_receipt "
        "--version 1)"
    )
    assert _counts(engine) == before  # no step record, no signature
    with read_session(engine.database_url) as s:
        last = s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc())).first()
    assert last is not None
    assert (last.action, last.reason) == ("sign.refused", str(info.value))
    # Once trained, the same person signs.
    training.grant_training(
        engine, "new.tech", "demo_hospital", "dose_receipt", 1, trainer="Test Trainer", officer=Officer("qa", PASSWORD)
    )
    signing_service.submit_step(engine, run_id, "arrival", "new.tech", PASSWORD, ARRIVAL)
    wait_for(engine, run_id, step="identity_verification")


@pytest.mark.slow
def test_training_flow_refuses_a_signature_by_an_untrained_signer(engine: Settings) -> None:
    """A signature row that bypassed the submit-time check (written straight into the record with a
    correct hash) is refused by the flow when it re-checks the signer: the step waits again."""
    from flows.engine import client
    from flows.engine.gates import human_fields
    from flows.engine.steps import write_step
    from flows.record.tables import SopRun, User, utcnow
    from flows.record.versions import stored_sop
    from flows.services import runs as runs_service
    from flows.sop.inputs import coerce_values
    from tests.fixtures_engine import ARRIVAL, PASSWORD, sign, start_receipt, wait_for

    accounts.add_user(
        engine, "raw.tech", "Ra Wu", PASSWORD, [("demo_hospital", "cell_lab")], officer=Officer("qa", PASSWORD)
    )
    run_id = start_receipt(engine, coi="COI-TRAIN-0002")
    wait_for(engine, run_id, step="arrival")
    with write_session(engine.database_url) as s:
        run = s.get(SopRun, run_id)
        assert run is not None
        step = stored_sop(s, run).step("arrival")
        assert isinstance(step, HumanStepSpec)
        user = s.exec(select(User).where(User.username == "raw.tech")).one()
        data = coerce_values(human_fields(step), ARRIVAL, where="test")
        sig = Signature(
            run_id=run.id,
            step_id="arrival",
            user_id=user.id,
            printed_name=user.printed_name,
            meaning="performed",
            statement=step.meaning,
            signed_at=utcnow(),
            signed_sha256="",
        )
        sig.signed_sha256 = ledger.sha256_hex(ledger.canonical(ledger.signed_content(run, "arrival", data, sig)))
        ledger.append(s, sig, actor=user.id, action="signature.create")
        write_step(s, run.id, "arrival", "record", "signed", data, actor=user.id, actor_id=user.id, signature_id=sig.id)
        flow_run_id, sig_id = run.flow_run_id, sig.id
    client.resume(engine, flow_run_id, "arrival", sig_id)

    def refusals() -> list[dict[str, str]]:
        hist = [h for h in runs_service.quality_record(engine, run_id)["history"] if h["step_id"] == "arrival"]
        refused = [h for h in hist if h["status"] == "refused"]
        return refused if refused and hist[-1]["status"] == "waiting" else []

    refused = eventually(refusals, "the flow never refused the untrained signer's signature")
    assert "user 'raw.tech' is not trained on dose_receipt v1" in refused[0]["reason"]
    with read_session(engine.database_url) as s:
        audited = s.exec(
            select(AuditEvent).where(
                AuditEvent.action == "step.refused", col(AuditEvent.payload_json).contains("'raw.tech' is not trained")
            )
        ).first()
    assert audited is not None
    sign(engine, run_id, "arrival", "tech", ARRIVAL)  # a trained signer still gets through
    wait_for(engine, run_id, step="identity_verification")
