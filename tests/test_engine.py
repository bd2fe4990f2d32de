"""The run-sop flow for real: a local Prefect server, the executor process, signed input."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import pytest
from sqlmodel import func, select

from flows.errors import (
    AuthenticationError,
    NotAuthorizedError,
    SopInputError,
    StepNotWaitingError,
)
from flows.record.db import read_session
from flows.record.tables import AuditEvent, Signature, SopRun, StepRecord
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from tests.fixtures_engine import ARRIVAL, PASSWORD, sign, start_receipt, wait_for
from tests.stored import stored_text
from tests.waiting import LIMIT, eventually

pytestmark = pytest.mark.slow


def _counts(settings) -> tuple[int, int, int]:
    with read_session(settings.database_url) as s:
        return (
            s.exec(select(func.count()).select_from(StepRecord)).one(),
            s.exec(select(func.count()).select_from(Signature)).one(),
            s.exec(select(func.count()).select_from(AuditEvent)).one(),
        )


def _task_run_names(settings, flow_run_id: str, expected: set[str]) -> set[str]:
    """Task runs reach the server asynchronously: wait for them, never sleep a fixed time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    names: set[str] = set()
    with get_client(sync_client=True) as client:

        def arrived() -> bool:
            nonlocal names
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
            names = {r.name for r in runs if r.state and r.state.is_completed()}
            return expected <= names

        eventually(arrived, lambda: f"task runs {sorted(expected - names)} never completed", every=0.1)
    return names


def test_run_sop_accepted_receipt_completes_with_document_and_notification(engine, receiver):
    run_id = start_receipt(engine)
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    sign(engine, run_id, "qa_acceptance", "qa", {"decision": "approve"})
    rec = wait_for(engine, run_id, statuses=("completed", "rejected", "stopped"))

    assert rec["run"]["status"] == "completed"
    steps = {s["id"]: s for s in rec["steps"]}
    assert [s["status"] for s in rec["steps"]] == ["done"] * 7
    assert steps["arrival"]["data"]["logger_max_c"] == -171.5
    assert steps["arrival"]["data"]["arrived_at"] == "2026-11-25T01:40:00+00:00"  # stored in UTC
    assert steps["arrival"]["signature"]["printed_name"] == "Li Wei"
    assert steps["arrival"]["signature"]["meaning"] == "performed"
    assert steps["identity_verification"]["signature"]["meaning"] == "verified"
    assert steps["qa_acceptance"]["signature"]["meaning"] == "approved"
    assert all(s["signature"]["valid"] for s in rec["steps"] if s["signature"])
    assert steps["transit_temperature"]["data"]["passed"] is True
    doc = rec["documents"][0]
    text = stored_text(doc["path"], engine.database_url)
    assert not Path(doc["path"]).is_absolute()  # the same name on every node: the bytes are in the database
    import hashlib

    assert hashlib.sha256(text.encode()).hexdigest() == doc["sha256"]
    assert "COI-TEST-0001" in text
    assert "Wang Fang" in text
    msg = receiver.wait_for(
        lambda m: m["path"] == "/physician" and "COI-TEST-0001" in m.get("message", ""), timeout=LIMIT
    )
    assert msg is not None
    assert "accepted and in stock" in msg["message"]
    waiting = receiver.wait_for(
        lambda m: m["path"] == "/pharmacist" and "Waiting on you" in m.get("title", "") and run_id in m["message"],
        timeout=LIMIT,
    )
    assert waiting is not None  # what waits, for which dose, due when, and the link to the step's page
    assert waiting["title"].endswith("· COI-TEST-0001")
    for shown in (
        "Tecartus",
        "LOT-1",
        "Pharmacist",
        "Due: no time limit",
        f"/runs/{run_id}/steps/identity_verification",
    ):
        assert shown in waiting["message"]
    # Prefect's history holds one task run per automated step, named sop/step.
    # Wait for all four: under load the last task run's state reaches the server after the run's end.
    expected = {
        "dose_receipt/transit_temperature",
        "dose_receipt/identity_matches",
        "dose_receipt/receipt_record",
        "dose_receipt/tell_ward",
    }
    names = _task_run_names(engine, rec["run"]["flow_run_id"], expected)
    assert expected <= names


def test_run_sop_temperature_excursion_opens_deviation_and_waits_for_disposition(engine):
    run_id = start_receipt(engine, coi="COI-TEST-0002")
    sign(engine, run_id, "arrival", "tech", {**ARRIVAL, "logger_max_c": "-120"})
    rec = wait_for(engine, run_id, step="transit_temperature__disposition")
    assert rec["run"]["status"] == "waiting"
    assert rec["deviations"][0]["classification"] == "major"
    assert rec["deviations"][0]["disposition"] == "waiting"
    assert {s["id"]: s["status"] for s in rec["steps"]}["identity_verification"] == "not reached"
    with pytest.raises(SopInputError, match="a reason is required to reject"):
        signing_service.submit_step(
            engine, run_id, "transit_temperature__disposition", "qa", PASSWORD, {"decision": "reject"}
        )
    sign(engine, run_id, "transit_temperature__disposition", "qa", {"decision": "reject", "reason": "excursion"})
    rec = wait_for(engine, run_id, statuses=("rejected", "completed"))
    assert rec["run"]["status"] == "rejected"
    assert rec["deviations"][0]["decision"] == "reject"


def test_submit_value_out_of_range_is_refused_and_writes_nothing(engine):
    run_id = start_receipt(engine, coi="COI-TEST-0003")
    wait_for(engine, run_id, step="arrival")
    before = _counts(engine)
    with read_session(engine.database_url) as s:
        mark = s.exec(select(func.max(AuditEvent.seq))).one()
    with pytest.raises(SopInputError) as info:
        signing_service.submit_step(engine, run_id, "arrival", "tech", PASSWORD, {**ARRIVAL, "logger_max_c": "-250"})
    assert "logger_max_c: -250 °C is below the minimum -200 °C" in str(info.value)
    assert _counts(engine)[:2] == before[:2]  # no step record, no signature
    # Nor an audit event of this step: the shared engine's sweeps and deliveries may write their own
    # meanwhile (on a busy machine one landed inside this window), so only step and signature events count.
    with read_session(engine.database_url) as s:
        written = s.exec(select(AuditEvent).where(AuditEvent.seq > mark)).all()
    steps = [e for e in written if e.object_type in ("sf_step_record", "sf_signature") or e.action.startswith("sign")]
    assert [(e.action, e.object_id) for e in steps] == [], [e.action for e in written]


def test_submit_without_the_role_is_refused_audited_and_records_no_step(engine):
    run_id = start_receipt(engine, coi="COI-TEST-0004")
    wait_for(engine, run_id, step="arrival")
    before = _counts(engine)
    with pytest.raises(NotAuthorizedError) as info:
        signing_service.submit_step(engine, run_id, "arrival", "pharm", PASSWORD, ARRIVAL)
    assert "may only be signed by role 'cell_lab'" in str(info.value)
    after = _counts(engine)
    assert after[:2] == before[:2]  # no step record, no signature
    with read_session(engine.database_url) as s:
        last = s.exec(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert last.action == "sign.refused"
    assert "role 'cell_lab'" in last.reason


def test_submit_wrong_password_is_refused_and_audited(engine):
    run_id = start_receipt(engine, coi="COI-TEST-0005")
    wait_for(engine, run_id, step="arrival")
    with pytest.raises(AuthenticationError, match="wrong user name or password"):
        signing_service.submit_step(engine, run_id, "arrival", "tech", "not-the-password", ARRIVAL)
    with read_session(engine.database_url) as s:
        last = s.exec(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert last.action == "auth.failed"
    assert last.actor == "tech"


def test_submit_to_a_step_not_reached_is_refused(engine):
    run_id = start_receipt(engine, coi="COI-TEST-0006")
    wait_for(engine, run_id, step="arrival")
    with pytest.raises(StepNotWaitingError, match="not waiting for input"):
        signing_service.submit_step(engine, run_id, "qa_acceptance", "qa", PASSWORD, {"decision": "approve"})


def test_forged_resume_through_prefects_client_is_refused_and_the_step_waits_again(engine):
    from prefect.flow_runs import resume_flow_run

    run_id = start_receipt(engine, coi="COI-TEST-0007")
    rec = wait_for(engine, run_id, step="arrival")
    flow_run_id = UUID(rec["run"]["flow_run_id"])
    _wait_paused(flow_run_id)
    resume_flow_run(flow_run_id, run_input={"signature_id": "made-up"})
    rec = _wait_refused(engine, run_id, "arrival")
    refused = [h for h in rec["history"] if h["status"] == "refused"]
    assert "made-up" in refused[0]["reason"]
    with read_session(engine.database_url) as s:
        assert s.exec(select(AuditEvent).where(AuditEvent.action == "step.refused")).first() is not None
    # The gate waits again under a new key; the real signature still goes through.
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    wait_for(engine, run_id, step="identity_verification")


def test_resume_with_another_steps_signature_is_not_accepted_and_the_step_keeps_waiting(engine):
    """A resume carrying the signature of a step already accepted (a late duplicate of a delivered
    resume, or a replay) is never taken for the waiting step: audited ``resume.stale``, the step
    stays ``waiting`` (never ``refused``, so its signer is not turned away meanwhile), and it
    suspends under a fresh key that the real signature then resumes."""
    from prefect.flow_runs import resume_flow_run

    run_id = start_receipt(engine, coi="COI-TEST-0008")
    first = sign(engine, run_id, "arrival", "tech", ARRIVAL)
    rec = wait_for(engine, run_id, step="identity_verification")
    flow_run_id = UUID(rec["run"]["flow_run_id"])
    _wait_paused(flow_run_id)
    resume_flow_run(flow_run_id, run_input={"signature_id": first.signature_id})
    stale = _wait_audit(engine, "resume.stale", f"{run_id}/identity_verification")
    assert json.loads(stale.payload_json)["signature_id"] == first.signature_id
    rec = wait_for(engine, run_id, step="identity_verification")
    assert [h["status"] for h in rec["history"] if h["step_id"] == "identity_verification"] == ["waiting"]
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    wait_for(engine, run_id, step="qa_acceptance")


def _wait_audit(settings, action: str, object_id: str) -> AuditEvent:
    def event() -> AuditEvent | None:
        with read_session(settings.database_url) as s:
            return s.exec(
                select(AuditEvent).where(AuditEvent.action == action, AuditEvent.object_id == object_id)
            ).first()

    return eventually(event, f"no {action} event for {object_id}", every=0.1)


def test_verifier_may_not_be_the_performer(engine):
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.training import grant_training

    qa = Officer("qa", PASSWORD)
    add_user(
        engine,
        "both",
        "Sun Li",
        PASSWORD,
        [("demo_hospital", "cell_lab"), ("demo_hospital", "pharmacist")],
        officer=qa,
    )
    grant_training(engine, "both", "demo_hospital", "dose_receipt", 1, trainer="Test Trainer", officer=qa)
    run_id = start_receipt(engine, coi="COI-TEST-0009")
    sign(engine, run_id, "arrival", "both", ARRIVAL)
    wait_for(engine, run_id, step="identity_verification")
    with pytest.raises(NotAuthorizedError, match="the person who performed 'arrival' may not verify it"):
        signing_service.submit_step(
            engine, run_id, "identity_verification", "both", PASSWORD, {"coi_matches": "yes", "documents": "complete"}
        )


def test_rerunning_a_completed_run_repeats_no_step(engine):
    """Every step is idempotent: the flow re-entered from the top (as after a resume) writes nothing new."""
    from prefect.flow_engine import run_flow

    from flows.engine.run_sop import run_sop

    run_id = start_receipt(engine, coi="COI-TEST-0010")
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    sign(engine, run_id, "qa_acceptance", "qa", {"decision": "approve"})
    wait_for(engine, run_id, statuses=("completed",))
    before = _counts(engine)
    import asyncio

    result = asyncio.run(run_flow(run_sop, parameters={"run_id": run_id}))
    assert result["status"] == "completed"
    assert _counts(engine) == before


def test_start_with_bad_parameters_writes_nothing(engine):
    before = _counts(engine)
    with pytest.raises(SopInputError) as info:
        runs_service.start_run(
            engine,
            "demo_hospital",
            "dose_receipt",
            {"product": "tecartas", "coi": "bad id", "lot": "L-1", "patient_id": "secret patient"},
            "qm",
            PASSWORD,
        )
    text = str(info.value)
    assert "Did you mean 'tecartus'" in text
    assert "coi" in text
    assert "secret patient" not in text  # PHI is never echoed
    assert _counts(engine) == before


def test_start_on_a_product_with_unconfirmed_limits_is_refused(engine):
    with pytest.raises(SopInputError, match=r"storage_max_c, thaw_to_infusion_max_min"):
        runs_service.start_run(
            engine, "demo_hospital", "dose_receipt", {**_params(), "product": "axi_cel"}, "qm", PASSWORD
        )


def test_start_by_a_role_the_sop_does_not_admit_is_refused_and_audited(engine):
    """dose_receipt says ``start_roles: [quality_manager, coordinator]``: a technician may sign its steps, not start it."""
    with read_session(engine.database_url) as s:
        runs_before = s.exec(select(func.count()).select_from(SopRun)).one()
    with pytest.raises(
        NotAuthorizedError,
        match=r"dose_receipt may only be started by role 'quality_manager' or 'coordinator' of "
        r"'demo_hospital'; user 'tech' holds 'cell_lab'",
    ):
        runs_service.start_run(engine, "demo_hospital", "dose_receipt", _params(), "tech", PASSWORD)
    with read_session(engine.database_url) as s:
        assert s.exec(select(func.count()).select_from(SopRun)).one() == runs_before
        refused = s.exec(
            select(AuditEvent).where(AuditEvent.action == "run.start.refused").order_by(AuditEvent.seq.desc())
        ).first()  # type: ignore[union-attr]
    assert refused is not None
    assert "may only be started by role 'quality_manager'" in (refused.reason or "")


def test_lost_resume_is_delivered_by_the_executor(engine):
    """A signature recorded while its resume never reached Prefect is resumed by the executor's sweep."""
    run_id = start_receipt(engine, coi="COI-TEST-0011")
    wait_for(engine, run_id, step="arrival")
    res = signing_service.submit_step(engine, run_id, "arrival", "tech", PASSWORD, ARRIVAL, resume=False)
    assert res.resumed is False
    wait_for(engine, run_id, step="identity_verification")


def test_a_suspend_cut_off_before_its_input_schema_was_saved_is_resumed_by_the_sweep_once_it_is_old(engine):
    """``suspend_flow_run`` sets the run Paused, then saves the schema of its input: a kill -9 between
    the two leaves a run Prefect refuses to resume ("Run input schema not found"), with its signature
    in the record. That state is made here as the kill leaves it (the schema removed from a suspended
    run). The sweep leaves a run paused for less than ``repair_after`` alone (it may still be
    suspending: saving the schema then failed the flow's own save), then saves it and resumes."""
    from prefect.client.orchestration import get_client

    from flows.engine.client import _has_input, resume_signed_runs

    run_id = start_receipt(engine, coi="COI-TEST-0013")
    flow_run_id = UUID(wait_for(engine, run_id, step="arrival")["run"]["flow_run_id"])
    _wait_paused(flow_run_id)
    with get_client(sync_client=True) as client:
        schema = client.read_flow_run(flow_run_id).state.state_details.run_input_keyset["schema"]
        eventually(  # the suspend saves it just after it sets Paused
            lambda: _has_input(client, flow_run_id, schema),
            f"flow run {flow_run_id} paused, but its input schema was never saved",
        )
        client.delete_flow_run_input(flow_run_id, schema)
        refused = client.resume_flow_run(flow_run_id, run_input={"signature_id": "none"})
        assert "Run input schema not found" in str(refused.details), refused  # what the cut-off suspend leaves
        res = signing_service.submit_step(engine, run_id, "arrival", "tech", PASSWORD, ARRIVAL, resume=True)
        assert res.resumed is False  # the signer's resume is refused too: nothing repairs it on their path
        assert resume_signed_runs(engine, client, grace=0, repair_after=3600) == 0
        assert client.read_flow_run(flow_run_id).state.is_paused()
        assert resume_signed_runs(engine, client, grace=0, repair_after=0) == 1
    wait_for(engine, run_id, step="identity_verification")


def _params() -> dict[str, str]:
    from tests.fixtures_engine import PARAMS

    return dict(PARAMS)


def _wait_paused(flow_run_id: UUID) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:

        def paused() -> bool:
            state = client.read_flow_run(flow_run_id).state
            return state is not None and state.is_paused()

        eventually(paused, "the flow run never suspended")


def _wait_refused(settings, run_id: str, step: str) -> dict:
    rec: dict = {"history": []}

    def refused() -> dict | None:
        nonlocal rec
        rec = runs_service.quality_record(settings, run_id)
        hist = [h for h in rec["history"] if h["step_id"] == step]
        return rec if any(h["status"] == "refused" for h in hist) and hist[-1]["status"] == "waiting" else None

    return eventually(
        refused, lambda: f"no refusal recorded at {step}: {json.dumps(rec['history'], default=str)[:500]}"
    )


def test_rerunning_a_rejected_run_never_goes_past_the_rejection(engine):
    """A crash between QA's signed reject and the run's end must not let a re-entered run release the dose."""
    import asyncio

    from prefect.flow_engine import run_flow

    from flows.engine.run_sop import run_sop

    run_id = start_receipt(engine, coi="COI-TEST-0012")
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    sign(engine, run_id, "qa_acceptance", "qa", {"decision": "reject", "reason": "label damaged"})
    wait_for(engine, run_id, statuses=("rejected",))
    result = asyncio.run(run_flow(run_sop, parameters={"run_id": run_id}))
    assert result["status"] == "rejected"
    rec = runs_service.quality_record(engine, run_id)
    assert rec["run"]["status"] == "rejected"
    assert {s["id"]: s["status"] for s in rec["steps"]}["tell_ward"] == "not reached"
    with pytest.raises(StepNotWaitingError, match="is rejected: none of its steps can be signed"):
        signing_service.submit_step(engine, run_id, "qa_acceptance", "qa", PASSWORD, {"decision": "approve"})


def test_pause_key_of_one_step_never_matches_a_step_whose_id_extends_it():
    from prefect.states import Suspended

    from flows.engine.client import _paused_at

    assert _paused_at(Suspended(pause_key="arrival-0"), "arrival")
    assert _paused_at(Suspended(pause_key="arrival-12"), "arrival")
    assert not _paused_at(Suspended(pause_key="arrival-check-0"), "arrival")
    assert not _paused_at(Suspended(pause_key="temp--disposition-0"), "temp")
