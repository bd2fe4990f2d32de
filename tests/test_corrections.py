"""Corrections without erasure (EU GMP Annex 11 §9, 21 CFR 11.10(e)): ``signing_service.correct_step``
against a real record on SQLite and PostgreSQL. Each refusal test asserts that nothing was
written (and, for a refused person, that the refusal was audited)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
from rich.console import Console
from sqlmodel import func, select

from flows.cli.render import print_record
from flows.config import Settings, get_settings
from flows.errors import (
    AuthenticationError,
    NotAuthorizedError,
    SopInputError,
    StepNotWaitingError,
)
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.export import verify_export
from flows.record.tables import AuditEvent, Signature, StepRecord
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from tests.conftest import PASSWORD, MakeRun

ARRIVAL = {
    "arrived_at": "2026-11-25T01:40:00+00:00",
    "courier": "SF 1234",
    "shipper_id": "DS-0042",
    "seal_intact": True,
    "logger_max_c": -180.0,
    "transit_hours": 18.5,
}


@pytest.fixture(name="settings")
def settings_fixture(db_url: str) -> Settings:
    return dataclasses.replace(get_settings(), database_url=db_url)


def _done_arrival(db_url: str, make_run: MakeRun, *, check: bool = True) -> str:
    """A run whose arrival ana signed and the flow accepted (and, with ``check``, whose check ran)."""
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        signed = made.record(s, "arrival", "signed", ARRIVAL, user="ana", sign=True)
        made.record(s, "arrival", "done", ARRIVAL, user="ana", signature_id=signed.signature_id)
        if check:
            made.record(s, "transit_temperature", "done", {"passed": True})
        return made.run.id


def _counts(db_url: str) -> tuple[int, int, int]:
    with read_session(db_url) as s:
        return (
            s.exec(select(func.count()).select_from(StepRecord)).one(),
            s.exec(select(func.count()).select_from(Signature)).one(),
            s.exec(select(func.count()).select_from(AuditEvent)).one(),
        )


def test_correction_leaves_original_visible_with_who_when_why(settings, db_url, make_run):
    run_id = _done_arrival(db_url, make_run)

    res = signing_service.correct_step(
        settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-175.5"}, "logger read from the wrong channel"
    )

    assert res.changes == {"logger_max_c": {"old": -180.0, "new": -175.5}}
    rec = runs_service.quality_record(settings, run_id)
    arrival = next(st for st in rec["steps"] if st["id"] == "arrival")
    assert arrival["status"] == "done"
    assert arrival["data"]["logger_max_c"] == -175.5
    assert arrival["data"]["courier"] == "SF 1234"  # values not given are carried over
    assert arrival["signature"]["meaning"] == "performed"  # the entry's own signature stays
    assert arrival["signature"]["valid"]
    [corr] = arrival["corrections"]
    assert corr["changes"] == {"logger_max_c": {"old": -180.0, "new": -175.5}}
    assert corr["by"] == "Ana Li 李安娜"
    assert corr["reason"] == "logger read from the wrong channel"
    assert corr["at"].endswith("+00:00")
    assert corr["signature"]["meaning"] == "corrected"
    assert corr["signature"]["valid"]
    assert corr["not_rerun"] == [{"step_id": "transit_temperature", "kind": "check"}]
    history = [h for h in rec["history"] if h["step_id"] == "arrival"]
    assert [h["status"] for h in history] == ["waiting", "signed", "done", "done"]
    assert history[2]["data"]["logger_max_c"] == -180.0  # the original, unchanged
    assert history[3]["supersedes"] == history[2]["id"]
    with read_session(db_url) as s:
        assert ledger.verify_chain(s).ok
        assert all(ledger.verify_signature(s, sig) is None for sig in s.exec(select(Signature)))
    buf = io.StringIO()
    print_record(Console(file=buf, width=200, color_system=None), rec)
    text = buf.getvalue()
    assert "-180.0 °C → -175.5 °C" in text
    assert "logger read from the wrong channel" in text
    assert "corrected after transit_temperature (check) had run" in text
    assert verify_export(json.loads(json.dumps(rec, default=str))) == []


def test_correction_twice_shows_every_correction(settings, db_url, make_run):
    run_id = _done_arrival(db_url, make_run)

    signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-175.5"}, "first")
    signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"courier": "SF 9999"}, "second")

    rec = runs_service.quality_record(settings, run_id)
    arrival = next(st for st in rec["steps"] if st["id"] == "arrival")
    assert [c["reason"] for c in arrival["corrections"]] == ["first", "second"]
    assert arrival["corrections"][1]["changes"] == {"courier": {"old": "SF 1234", "new": "SF 9999"}}
    assert arrival["data"]["logger_max_c"] == -175.5
    assert arrival["data"]["courier"] == "SF 9999"


def test_correction_without_reason_is_refused_and_writes_nothing(settings, db_url, make_run):
    run_id = _done_arrival(db_url, make_run)
    before = _counts(db_url)

    with pytest.raises(SopInputError, match="needs a reason") as info:
        signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-175"}, "  ")

    assert "--reason" in str(info.value)
    assert _counts(db_url) == before


def test_correction_by_user_without_role_is_refused_and_audited(settings, db_url, make_run):
    run_id = _done_arrival(db_url, make_run)
    steps_before, sigs_before, _ = _counts(db_url)

    with pytest.raises(NotAuthorizedError, match="may only be signed by role 'cell_lab'"):
        signing_service.correct_step(settings, run_id, "arrival", "bo", PASSWORD, {"logger_max_c": "-175"}, "typo")

    assert _counts(db_url)[:2] == (steps_before, sigs_before)
    with read_session(db_url) as s:
        ev = s.exec(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).one()  # type: ignore[union-attr]
    assert (ev.action, ev.object_id) == ("correct.refused", run_id)


def test_correction_with_wrong_password_is_refused_and_audited(settings, db_url, make_run):
    run_id = _done_arrival(db_url, make_run)
    steps_before, sigs_before, _ = _counts(db_url)

    with pytest.raises(AuthenticationError):
        signing_service.correct_step(settings, run_id, "arrival", "ana", "wrong", {"logger_max_c": "-175"}, "typo")

    assert _counts(db_url)[:2] == (steps_before, sigs_before)
    with read_session(db_url) as s:
        assert s.exec(select(AuditEvent).where(AuditEvent.action == "auth.failed")).first() is not None


def test_correction_of_step_not_done_is_refused_and_writes_nothing(settings, db_url, make_run):
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        run_id = made.run.id
    before = _counts(db_url)

    with pytest.raises(StepNotWaitingError, match="cannot be corrected: it is waiting; only a done step"):
        signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-175"}, "typo")
    with pytest.raises(StepNotWaitingError, match="it is not reached yet"):
        signing_service.correct_step(settings, run_id, "qa_acceptance", "ana", PASSWORD, {"reason": "x"}, "typo")
    with pytest.raises(StepNotWaitingError, match="has no human step 'transit_temperature'"):
        signing_service.correct_step(settings, run_id, "transit_temperature", "ana", PASSWORD, {"passed": "no"}, "typo")

    assert _counts(db_url) == before


def test_correction_with_unchanged_or_invalid_values_is_refused(settings, db_url, make_run):
    run_id = _done_arrival(db_url, make_run)
    before = _counts(db_url)

    with pytest.raises(SopInputError, match="nothing to correct: the values given equal the current ones"):
        signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-180"}, "typo")
    with pytest.raises(SopInputError, match="nothing to correct: give the corrected values"):
        signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {}, "typo")
    with pytest.raises(SopInputError, match=r"logger_max_c: .* is below the minimum"):
        signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-500"}, "typo")
    with pytest.raises(SopInputError, match="unknown field 'logger'"):
        signing_service.correct_step(settings, run_id, "arrival", "ana", PASSWORD, {"logger": "-175"}, "typo")

    assert _counts(db_url) == before


def test_correction_of_an_approval_decision_is_refused(settings, db_url, make_run):
    with write_session(db_url) as s:
        made = make_run(s)
        data = {"decision": "approve", "reason": None}
        signed = made.record(s, "qa_acceptance", "signed", data, user="ana", sign=True)
        made.record(s, "qa_acceptance", "done", data, user="ana", signature_id=signed.signature_id)
        run_id = made.run.id
    before = _counts(db_url)

    with pytest.raises(SopInputError, match="a decision cannot be corrected"):
        signing_service.correct_step(
            settings, run_id, "qa_acceptance", "ana", PASSWORD, {"decision": "reject", "reason": "x"}, "changed my mind"
        )

    assert _counts(db_url) == before


def test_correction_shows_in_the_receipt_document(settings, db_url, make_run):
    from flows.outputs.documents import render_document
    from flows.record.query import run_record
    from tests.conftest import TEMPLATES

    run_id = _done_arrival(db_url, make_run)
    signing_service.correct_step(
        settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-175.5"}, "wrong channel"
    )
    with read_session(db_url) as s:
        record = run_record(s, run_id, with_history=False)

    html, _ = render_document(
        TEMPLATES,
        "demo_hospital",
        "Asia/Shanghai",
        "dose_receipt.html.j2",
        {"record": record, "step": {"id": "receipt_record", "title": "Receipt"}},
    )

    assert "<strong>Corrected</strong>" in html
    assert "-180.0 → -175.5 °C" in html
    assert "wrong channel" in html
    assert "Corrected after transit_temperature (check) had run on the earlier value; not re-run." in html


def test_correction_command_corrects_and_refuses_without_reason(db_url, make_run):
    from typer.testing import CliRunner

    from flows.cli import app

    run_id = _done_arrival(db_url, make_run)
    env = {"SOPFLOW_DATABASE_URL": db_url, "SOPFLOW_PASSWORD": PASSWORD}
    runner = CliRunner()

    refused = runner.invoke(app, ["correct", run_id, "arrival", "--as", "ana", "--set", "courier=SF 1"], env=env)
    done = runner.invoke(
        app,
        ["correct", run_id, "arrival", "--as", "ana", "--set", "courier=SF 1", "--reason", "airway bill misread"],
        env=env,
    )

    assert refused.exit_code == 1
    assert "a correction needs a reason (--reason)" in refused.output
    assert done.exit_code == 0, done.output
    assert "corrected arrival of run" in done.output
    assert "'SF 1234' → 'SF 1'" in done.output
