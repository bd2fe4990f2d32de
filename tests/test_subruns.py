"""Sub-runs, deviations handled by their SOP, quarantine, `sopflow deviations` and the chain of
identity, against the real Prefect server and executor (tests/sops/engine/dev_hospital)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from flows.cli import app
from flows.errors import NotAuthorizedError, SopInputError, StepNotWaitingError
from flows.record.db import read_session
from flows.record.export import verify_export
from flows.record.tables import AuditEvent, SopRun
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from tests.fixtures_engine import PASSWORD, wait_for
from tests.waiting import eventually

pytestmark = pytest.mark.slow

INST = "dev_hospital"
SOPS = ("parent_flow", "child_flow", "receipt", "deviation_capa", "collection", "storage", "infusion")


@pytest.fixture(name="dev", scope="module")
def dev_fixture(engine):
    """dev_hospital's staff, trained on its SOPs."""
    from tests.seed import seed_training, seed_user

    for username, role in (("dv_tech", "cell_lab"), ("dv_qa", "qa"), ("dv_qa2", "qa"), ("dv_doc", "physician")):
        seed_user(engine, username, username.replace("_", " ").title(), PASSWORD, [(INST, role)])
        for sop in SOPS:
            seed_training(engine, username, INST, sop, 1)
    return engine


def _start(settings, sop_id: str, coi: str, **params: str) -> str:
    return runs_service.start_run(settings, INST, sop_id, {"coi": coi, **params}, "dv_tech", PASSWORD).run_id


def _sign(settings, run_id: str, step: str, user: str, values: dict) -> None:
    wait_for(settings, run_id, step=step)
    signing_service.submit_step(settings, run_id, step, user, PASSWORD, values)


def _child(settings, run_id: str, link: str) -> str:
    """The sub-run a parent's link step started (waits until it has)."""

    def child() -> str | None:
        with read_session(settings.database_url) as s:
            row = s.exec(select(SopRun).where(SopRun.parent_run_id == run_id, SopRun.parent_step_id == link)).first()
            return row.id if row is not None else None

    return eventually(child, f"run {run_id} started no sub-run at {link}")


def _final(settings, run_id: str) -> dict:
    return wait_for(settings, run_id, statuses=("completed", "rejected", "stopped", "failed"))


def test_parent_waits_for_its_sub_run_then_reads_its_data(dev):
    parent = _start(dev, "parent_flow", "COI-DEV-0001")
    child = _child(dev, parent, "child")
    rec = wait_for(dev, parent, statuses=("waiting",))
    assert {s["id"]: s["status"] for s in rec["steps"]}["child"] == "waiting"

    _sign(dev, child, "confirm", "dv_tech", {"ok": "yes"})
    rec = _final(dev, parent)

    assert rec["run"]["status"] == "completed"
    steps = {s["id"]: s for s in rec["steps"]}
    assert steps["child"]["data"]["status"] == "completed"
    assert steps["child"]["data"]["confirm"]["ok"] == "yes"
    assert steps["child_ok"]["data"]["passed"] is True
    with read_session(dev.database_url) as s:
        row = s.get(SopRun, child)
        started = s.exec(
            select(AuditEvent).where(AuditEvent.object_id == child, AuditEvent.action == "run.start")
        ).one()
        parent_row = s.get(SopRun, parent)
    assert (row.parent_run_id, row.parent_step_id, row.started_by) == (parent, "child", parent_row.started_by)
    assert json.loads(row.params_json)["note"] == "started by COI-DEV-0001"
    assert started.actor == "system"
    assert "on behalf of its starter" in started.reason


def test_failed_check_runs_deviation_sop_quarantines_the_dose_and_reject_ends_parent(dev):
    coi = "COI-DEV-0002"
    receipt = _start(dev, "receipt", coi)
    _sign(dev, receipt, "arrival", "dv_tech", {"logger_max_c": "-120"})
    handler = _child(dev, receipt, "cold_enough__deviation")
    rec = wait_for(dev, receipt, statuses=("waiting",))
    dev_id = rec["deviations"][0]["id"]
    with read_session(dev.database_url) as s:
        params = json.loads(s.get(SopRun, handler).params_json)
    assert params == {"deviation_id": dev_id, "coi": coi, "parent_run_id": receipt}

    # The quarantined dose starts no other run; the refusal names the deviation.
    with pytest.raises(NotAuthorizedError, match=f"quarantined by deviation {dev_id}"):
        _start(dev, "storage", coi)
    # A deviation SOP run must name a real deviation.
    with pytest.raises(SopInputError, match="is not a deviation id"):
        _start(dev, "deviation_capa", coi, deviation_id="nope")

    _sign(dev, handler, "containment", "dv_qa", {"action": "dose moved to quarantine shelf"})
    # QA's disposition rejects the dose: decided at once, whatever the physician will say.
    _sign(dev, handler, "disposition", "dv_qa", {"outcome": "destroy", "rationale": "excursion too long"})
    rec = _final(dev, receipt)

    assert rec["run"]["status"] == "rejected"
    assert "reject" in rec["run"]["status_detail"]
    assert {s["id"]: s["status"] for s in rec["steps"]}["put_away"] == "not reached"
    # The disposition lifted the quarantine: the dose may be handled (e.g. stored for return) again.
    later = _start(dev, "storage", coi)
    assert wait_for(dev, later, step="done")["run"]["status"] == "waiting"
    listed = runs_service.deviations(dev)
    mine = next(d for d in listed["deviations"] if d["id"] == dev_id)
    assert (mine["status"], mine["decision"], mine["quarantined"]) == ("dispositioned", "reject", False)
    assert [e["kind"] for e in mine["events"]] == ["subrun", "contained", "disposition"]
    # The quality record shows the link, the sub-run and the lifecycle; its export verifies offline.
    rec = runs_service.quality_record(dev, receipt)
    assert rec["subruns"][0]["id"] == handler
    assert rec["subruns"][0]["sop_id"] == "deviation_capa"
    link = {s["id"]: s for s in rec["steps"]}["cold_enough__deviation"]
    assert (link["status"], link["data"]["decision"], link["data"]["reason"]) == (
        "done",
        "reject",
        "excursion too long",
    )
    assert link["data"]["disposition"] == "destroy"
    assert (rec["deviations"][0]["decision"], rec["deviations"][0]["status"]) == ("reject", "dispositioned")
    assert [e["kind"] for e in rec["deviations"][0]["lifecycle"]] == ["subrun", "contained", "disposition"]
    assert verify_export(json.loads(json.dumps(rec, default=str))) == []
    # A rejecting disposition rejects the dose, not the deviation: its SOP goes on to the CAPA. (Its
    # record says "waiting" once it waits there: a fresh-clone CI printed it between two steps and the
    # line was not there.)
    assert wait_for(dev, handler, step="physician_agreement")["run"]["status"] == "waiting"
    printed = CliRunner().invoke(app, ["record", receipt, "--as", "dv_qa"], env={"SOPFLOW_PASSWORD": PASSWORD})
    assert printed.exit_code == 0, printed.output
    assert f"{handler}  deviation_capa v1 from step cold_enough__deviation: waiting" in printed.output
    assert runs_service.quality_record(dev, handler)["run"]["parent_run_id"] == receipt
    # The chain shows the deviation's sub-run under the receipt, and why it is broken.
    chain = runs_service.chain_of_identity(dev, coi)
    assert [(r["sop_id"], r["depth"]) for r in chain["runs"]] == [("receipt", 0), ("deviation_capa", 1), ("storage", 0)]
    assert chain["unbroken"] is False
    problems = "\n".join(chain["problems"])
    assert f"run {receipt[:8]} (receipt) ended rejected" in problems
    assert f"deviation {dev_id} on run {receipt[:8]} (receipt) is dispositioned" in problems
    assert f"no completed collection run for {coi}" in problems


def test_quarantine_holds_another_runs_next_gate_until_approval_then_capa_overdue_and_closure(dev):
    coi = "COI-DEV-0003"
    other = _start(dev, "receipt", coi)  # started before the deviation: its arrival gate is open
    wait_for(dev, other, step="arrival")
    receipt = _start(dev, "receipt", coi)
    _sign(dev, receipt, "arrival", "dv_tech", {"logger_max_c": "-140"})
    handler = _child(dev, receipt, "cold_enough__deviation")

    # The other run may finish the gate it had open, but its next gate is held.
    _sign(dev, other, "arrival", "dv_tech", {"logger_max_c": "-180"})
    rec = wait_for(dev, other, statuses=("waiting",))

    def held() -> dict | None:
        rec = runs_service.quality_record(dev, other)
        return rec if {s["id"]: s["status"] for s in rec["steps"]}["put_away"] == "held" else None

    rec = eventually(held, "put_away of the other run was never held")
    assert {s["id"]: s["status"] for s in rec["steps"]}["put_away"] == "held"
    assert "quarantined by deviation" in rec["run"]["status_detail"]
    assert "put_away" in next(r for r in runs_service.list_runs(dev) if r["id"] == other)["waiting_on"]
    with pytest.raises(StepNotWaitingError, match="it is held"):
        signing_service.submit_step(dev, other, "put_away", "dv_tech", PASSWORD, {"position": "T1"})

    _sign(dev, handler, "containment", "dv_qa", {"action": "hold"})
    _sign(dev, handler, "disposition", "dv_qa", {"outcome": "use_with_risk_acceptance", "rationale": "2 min above"})
    # Use needs the physician's agreement too (the SOP's second disposition step): still quarantined.
    wait_for(dev, handler, step="physician_agreement")
    rec = runs_service.quality_record(dev, receipt)
    assert {s["id"]: s["status"] for s in rec["steps"]}["cold_enough__deviation"] == "waiting"
    assert rec["deviations"][0]["quarantined"] is True
    assert {s["id"]: s["status"] for s in runs_service.quality_record(dev, other)["steps"]}["put_away"] == "held"
    _sign(dev, handler, "physician_agreement", "dv_doc", {"decision": "approve"})
    # Approved: the parent goes on to put_away; the held run's gate opens too.
    wait_for(dev, receipt, step="put_away")
    wait_for(dev, other, step="put_away")

    due = "2026-12-01T09:00:00+08:00"
    wait_for(dev, handler, step="capa")
    with pytest.raises(SopInputError, match="owner: no user 'nobody'"):
        signing_service.submit_step(
            dev, handler, "capa", "dv_qa", PASSWORD, {"action": "a", "owner": "nobody", "due": due}
        )
    _sign(dev, handler, "capa", "dv_qa", {"action": "requalify shipper", "owner": "dv_qa2", "due": due})
    wait_for(dev, handler, step="closure")
    dev_id = runs_service.quality_record(dev, receipt)["deviations"][0]["id"]

    before = runs_service.deviations(dev, now=datetime.fromisoformat(due) - timedelta(days=1))
    after = runs_service.deviations(dev, now=datetime.fromisoformat(due) + timedelta(days=1))
    assert dev_id in {d["id"] for d in after["deviations"]}
    assert not [c for c in before["overdue_capas"] if c["deviation_id"] == dev_id]
    overdue = [c for c in after["overdue_capas"] if c["deviation_id"] == dev_id]
    assert [(c["owner"], c["action"]) for c in overdue] == [("dv_qa2", "requalify shipper")]
    printed = CliRunner().invoke(app, ["deviations", "--as-of", "2026-12-02T00:00:00+00:00"])
    assert printed.exit_code == 0, printed.output
    assert dev_id in printed.output
    assert "overdue CAPA" in printed.output
    assert "dv_qa2" in printed.output

    _sign(dev, handler, "closure", "dv_qa", {"decision": "approve"})
    _final(dev, handler)
    closed = runs_service.deviations(dev, now=datetime.fromisoformat(due) + timedelta(days=1))
    assert dev_id not in {d["id"] for d in closed["deviations"]}
    assert not [c for c in closed["overdue_capas"] if c["deviation_id"] == dev_id]


def test_chain_of_identity_lists_runs_in_order_and_flags_a_broken_chain(dev):
    coi = "COI-DEV-0005"
    for sop in ("collection", "receipt", "storage", "infusion"):
        run = _start(dev, sop, coi)
        if sop == "receipt":
            _sign(dev, run, "arrival", "dv_tech", {"logger_max_c": "-180"})
            _sign(dev, run, "put_away", "dv_tech", {"position": "T1-A3"})
        else:
            _sign(dev, run, "done", "dv_tech", {"ok": "yes"})
        assert _final(dev, run)["run"]["status"] == "completed"

    chain = runs_service.chain_of_identity(dev, coi)
    assert chain["unbroken"] is True, chain["problems"]
    assert [(r["sop_id"], r["stage"], r["status"]) for r in chain["runs"]] == [
        ("collection", "collection", "completed"),
        ("receipt", "receipt", "completed"),
        ("storage", "storage", "completed"),
        ("infusion", "infusion", "completed"),
    ]
    printed = CliRunner().invoke(app, ["chain", coi])
    assert printed.exit_code == 0
    assert "unbroken" in printed.output
    assert "[storage] storage v1" in printed.output

    # A later run on the dose that has not ended breaks the chain until it does.
    extra = _start(dev, "storage", coi)
    wait_for(dev, extra, step="done")
    broken = runs_service.chain_of_identity(dev, coi)
    assert broken["unbroken"] is False
    assert broken["problems"] == [f"run {extra[:8]} (storage) has not ended (it is waiting)"]
    printed = CliRunner().invoke(app, ["chain", coi])
    assert printed.exit_code == 1
    assert "chain broken" in printed.output
