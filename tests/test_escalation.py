"""Time-outs of human steps: ``escalate_overdue`` against a real record (SQLite and PostgreSQL),
with an injected clock instead of waiting hours; and once end to end against the real engine,
where apprise delivers the escalation to the real loopback receiver."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from sqlmodel import select

from flows.config import Settings, get_settings
from flows.engine.escalation import escalate_overdue, format_duration
from flows.errors import SopDefinitionError
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.tables import (
    Deviation,
    Escalation,
    SopRun,
    SopVersion,
    StepRecord,
    new_id,
    utcnow,
)
from flows.services import runs as runs_service
from flows.sop import load_sop
from flows.sop.model import SopDefinition
from tests.conftest import DEMO_SOP, FIXED_AT, MakeRun
from tests.fixtures_engine import ARRIVAL, sign, start_receipt, wait_for
from tests.waiting import LIMIT

TIMEOUT = timedelta(hours=4)  # qa_acceptance in sops/demo_hospital/dose_receipt.yaml


@pytest.fixture(name="settings")
def settings_fixture(db_url: str, tmp_path: Path) -> Settings:
    """The record's settings with no notification channels (the end-to-end test has the receiver)."""
    return dataclasses.replace(get_settings(), database_url=db_url, notify_config=tmp_path / "no-channels.yaml")


def _waiting_qa(db_url: str, make_run: MakeRun, *, sop_text: str | None = None) -> str:
    """A run whose qa_acceptance has waited since FIXED_AT (on ``sop_text``, the demo SOP by default)."""
    with write_session(db_url) as s:
        made = make_run(s)
        run = made.run
        if sop_text is not None:
            sop = SopDefinition.model_validate(yaml.safe_load(sop_text))
            version = SopVersion(
                institution="demo_hospital",
                sop_id=sop.id,
                version=sop.version,
                schema_version=1,
                sha256=ledger.sha256_hex(sop_text.encode()),
                text=sop_text,
                stored_at=FIXED_AT,
            )
            ledger.append(s, version, actor="system")
            run = SopRun(
                institution="demo_hospital",
                sop_version_id=version.id,
                sop_id=sop.id,
                sop_version=sop.version,
                sop_sha256=version.sha256,
                schema_version=1,
                params_json=made.run.params_json,
                product_json=made.run.product_json,
                flow_run_id=new_id(),
                started_by=made.run.started_by,
                started_at=FIXED_AT,
            )
            ledger.append(s, run, actor="system")
            made = dataclasses.replace(made, run=run, sop=sop)
        made.record(s, "qa_acceptance", "waiting", {"role": "qa"}, at=FIXED_AT)
        return run.id


def _escalations(db_url: str, run_id: str) -> list[Escalation]:
    with read_session(db_url) as s:
        return list(s.exec(select(Escalation).where(Escalation.run_id == run_id)))


def test_escalation_not_before_the_timeout(settings, db_url, make_run):
    run_id = _waiting_qa(db_url, make_run)

    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT - timedelta(seconds=1)) == 0

    assert _escalations(db_url, run_id) == []


def test_escalation_of_overdue_step_is_recorded_once(settings, db_url, make_run):
    run_id = _waiting_qa(db_url, make_run)

    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT + timedelta(minutes=12)) == 1
    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT + timedelta(hours=3)) == 0

    [esc] = _escalations(db_url, run_id)
    assert (esc.step_id, esc.kind, esc.to_role, esc.deviation_id) == (
        "qa_acceptance",
        "escalate",
        "quality_manager",
        None,
    )
    assert json.loads(esc.deliveries_json) == []  # no channel configured: recorded as such
    rec = runs_service.quality_record(settings, run_id)
    assert rec["escalations"][0]["waiting_since"] == "2026-11-02T01:30:00+00:00"
    qa = next(st for st in rec["steps"] if st["id"] == "qa_acceptance")
    assert qa["status"] == "waiting"
    assert qa["due_at"] == "2026-11-02T05:30:00+00:00"
    with read_session(db_url) as s:
        assert ledger.verify_chain(s).ok
        ev = s.exec(select(ledger.AuditEvent).where(ledger.AuditEvent.object_id == esc.id)).one()
    assert ev.action == "escalation.escalate"


def test_escalation_clock_not_restarted_by_a_refused_resume(settings, db_url, make_run):
    run_id = _waiting_qa(db_url, make_run)
    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT + timedelta(minutes=1)) == 1
    with write_session(db_url) as s:
        from flows.engine.steps import write_step

        write_step(s, run_id, "qa_acceptance", "approve", "refused", {"signature_id": "forged"}, reason="forged")
        write_step(s, run_id, "qa_acceptance", "approve", "waiting", {"role": "qa"})

    assert escalate_overdue(settings, now=utcnow() + TIMEOUT * 3) == 0

    assert len(_escalations(db_url, run_id)) == 1


def test_escalation_skips_a_step_no_longer_waiting(settings, db_url, make_run):
    run_id = _waiting_qa(db_url, make_run)
    with write_session(db_url) as s:
        from flows.engine.steps import write_step

        write_step(s, run_id, "qa_acceptance", "approve", "signed", {"decision": "approve", "reason": None})

    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT * 2) == 0


def test_escalation_on_timeout_deviation_opens_a_deviation_and_keeps_waiting(settings, db_url, make_run):
    text = DEMO_SOP.read_text(encoding="utf-8").replace(
        "    escalate_to: quality_manager\n",
        "    escalate_to: quality_manager\n    on_timeout: deviation\n    timeout_deviation: {classification: minor}\n",
    )
    run_id = _waiting_qa(db_url, make_run, sop_text=text)

    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT + timedelta(hours=1)) == 1
    assert escalate_overdue(settings, now=FIXED_AT + TIMEOUT + timedelta(hours=2)) == 0

    [esc] = _escalations(db_url, run_id)
    with read_session(db_url) as s:
        [dev] = s.exec(select(Deviation).where(Deviation.run_id == run_id)).all()
        newest = s.exec(
            select(StepRecord).where(StepRecord.run_id == run_id).order_by(StepRecord.n.desc()).limit(1)
        ).one()  # type: ignore[attr-defined]
    assert (esc.kind, esc.deviation_id) == ("deviation", dev.id)
    assert (dev.step_id, dev.classification, dev.quarantine) == ("qa_acceptance", "minor", False)
    assert dev.description == "step 'qa_acceptance' waited 5h 0m for its signer, longer than its time-out of 4h 0m"
    assert (newest.step_id, newest.status) == ("qa_acceptance", "waiting")
    rec = runs_service.quality_record(settings, run_id)
    assert rec["deviations"][0]["classification"] == "minor"


def test_sop_on_timeout_without_timeout_is_a_definition_error(tmp_path):
    text = DEMO_SOP.read_text(encoding="utf-8").replace(
        "    timeout: 4h\n    escalate_to: quality_manager\n", "    on_timeout: deviation\n"
    )
    path = tmp_path / "dose_receipt.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)

    assert [p.path for p in info.value.problems] == ["steps[4].on_timeout"]
    assert "'on_timeout' needs a 'timeout'" in info.value.problems[0].message


def test_sop_timeout_without_escalate_to_is_a_definition_error(tmp_path):
    text = DEMO_SOP.read_text(encoding="utf-8").replace("    escalate_to: quality_manager\n", "")
    path = tmp_path / "dose_receipt.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(SopDefinitionError, match="needs 'escalate_to': the role to tell"):
        load_sop(path)


def test_format_duration_reads_like_a_person_would_say_it():
    assert [format_duration(timedelta(seconds=s)) for s in (40, 1500, 15120, 273600)] == [
        "40s",
        "25m",
        "4h 12m",
        "3d 4h",
    ]


@pytest.mark.slow
def test_escalation_overdue_approval_is_delivered_by_apprise_once(engine, receiver):
    """The real path: a run waits at qa_acceptance in the engine; the clock passes its 4 h time-out."""
    run_id = start_receipt(engine)
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    wait_for(engine, run_id, step="qa_acceptance")

    later = utcnow() + TIMEOUT + timedelta(minutes=5)
    escalate_overdue(engine, now=later)
    escalate_overdue(engine, now=later + timedelta(minutes=30))

    def for_this_run(m):
        return m["path"] == "/quality_manager" and run_id in m.get("message", "") and "Overdue" in m.get("title", "")

    msg = receiver.wait_for(for_this_run, timeout=LIMIT)
    assert msg is not None
    assert re.search(
        r"QA acceptance into stock has waited 4 h \d+ min for QA officer to sign; its time limit is 4 h", msg["message"]
    )
    assert f"/runs/{run_id}/steps/qa_acceptance" in msg["message"]
    [esc] = _escalations(engine.database_url, run_id)
    assert [d["ok"] for d in json.loads(esc.deliveries_json)] == [True]
    assert len([m for m in receiver.messages if for_this_run(m)]) == 1
    rows = runs_service.list_runs(engine)
    assert next(r for r in rows if r["id"] == run_id)["overdue"] == []  # by the real clock it is not overdue yet
    sign(engine, run_id, "qa_acceptance", "qa", {"decision": "approve"})
    rec = wait_for(engine, run_id, statuses=("completed", "rejected", "stopped"))
    assert rec["run"]["status"] == "completed"
    assert rec["escalations"][0]["to_role"] == "quality_manager"


def test_the_inbox_reads_a_time_out_against_the_clock_of_each_call(settings, db_url, make_run):
    """The inbox keeps what waits between writes (flows.services.inbox): whether a step is overdue
    and the time left are worked out at every call, from the clock, not when the board was read."""
    from flows.services.inbox import urgent_inbox

    run_id = _waiting_qa(db_url, make_run)
    due = FIXED_AT + TIMEOUT
    early, _ = urgent_inbox(settings, "ana", now=due - timedelta(minutes=1))
    late, _ = urgent_inbox(settings, "ana", now=due + timedelta(minutes=1))  # no write between: the same board

    [before] = [i for i in early if i["run_id"] == run_id and i["step_id"] == "qa_acceptance"]
    [after] = [i for i in late if i["run_id"] == run_id and i["step_id"] == "qa_acceptance"]
    assert (before["overdue_since"], before["seconds_left"]) == (None, 60.0)
    assert (after["overdue_since"], after["seconds_left"]) == (due, -60.0)
