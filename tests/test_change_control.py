"""A new SOP version walks from Draft to Effective through the built-in change-control SOP, run
by the real engine (Prefect server + executor); runs stay pinned to the version they started on."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select

from flows.errors import NotAuthorizedError, SopNotEffectiveError
from flows.record.db import read_session
from flows.record.tables import AuditEvent, OutboxMessage, Signature, TrainingAssignment, User, utcnow
from flows.record.versions import versions_of
from flows.services import audit as audit_service
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from flows.services.accounts import add_user
from flows.services.drafts import create_draft, submit_change
from flows.services.guard import Officer
from flows.services.sweeps import sweep
from flows.services.training import coverage_rows, grant_training
from flows.services.versions import list_versions
from tests.fixtures_engine import PASSWORD, wait_for
from tests.waiting import eventually

INST = "demo_hospital"
PROBE = """# Owner: test · Approval: none · Effective: when change control says
schema_version: 1
id: cc_probe
title: Change-control probe
version: {version}
params:
  lot: {{type: text, pattern: "^[A-Z0-9-]{{3,30}}$"}}
steps:
  - id: measure
    kind: record
    role: cell_lab
    meaning: Measured it
    fields:
      value: {{type: number, min: 0, max: {limit}}}
"""


def _states(settings) -> dict[int, str]:
    with read_session(settings.database_url) as s:
        return {i.version.version: i.state for i in versions_of(s, INST, "cc_probe")}


def _refusals(settings, since: int) -> list[AuditEvent]:
    with read_session(settings.database_url) as s:
        return list(
            s.exec(select(AuditEvent).where(col(AuditEvent.seq) > since, col(AuditEvent.action).endswith("refused")))
        )


def _head(settings) -> int:
    with read_session(settings.database_url) as s:
        return s.exec(select(AuditEvent.seq).order_by(col(AuditEvent.seq).desc()).limit(1)).one()


def _change(settings, tmp_path: Path, version: int, limit: int, effective_in: timedelta) -> str:
    """Draft → In review → Approved → Issued, through the change-control run; returns its run id."""
    path = tmp_path / "cc_probe.yaml"
    path.write_text(PROBE.format(version=version, limit=limit), encoding="utf-8")
    create_draft(settings, INST, path.read_text(encoding="utf-8"), name=str(path), username="cc_adm", password=PASSWORD)
    assert _states(settings)[version] == "draft"
    run_id = submit_change(
        settings,
        INST,
        "cc_probe",
        version,
        reviewer="cc_rev",
        reason=f"limit {limit}",
        username="cc_adm",
        password=PASSWORD,
    )
    assert _states(settings)[version] == "in_review"
    wait_for(settings, run_id, step="review")
    signing_service.submit_step(settings, run_id, "review", "cc_rev", PASSWORD, {"decision": "approve"})
    wait_for(settings, run_id, step="qa_approval")
    mark = _head(settings)
    # The author holds role qa too: they still may not approve their own change (refused, audited).
    with pytest.raises(NotAuthorizedError, match="the author of a change may not approve it"):
        signing_service.submit_step(settings, run_id, "qa_approval", "cc_adm", PASSWORD, {"decision": "approve"})
    assert [e.action for e in _refusals(settings, mark)] == ["sign.refused"]
    effective_at = (utcnow() + effective_in).isoformat()
    signing_service.submit_step(
        settings,
        run_id,
        "qa_approval",
        "qa",
        PASSWORD,
        {"decision": "approve", "effective_at": effective_at, "training_days": "0"},
    )
    wait_for(settings, run_id, statuses=("completed",))
    sweep(settings)  # the executor's sweep may have done it already: the same outcome
    assert _states(settings)[version] == "issued"
    return run_id


def test_change_control_walks_a_version_to_effective_and_runs_stay_pinned(engine, tmp_path):
    settings = engine
    qa = Officer("qa", PASSWORD)
    add_user(settings, "cc_adm", "Zhou Admin", PASSWORD, [(INST, "sop_admin"), (INST, "qa")], officer=qa)
    add_user(settings, "cc_rev", "Xu Reviewer", PASSWORD, [(INST, "sop_reviewer")], officer=qa)
    add_user(settings, "cc_tech", "He Tech", PASSWORD, [(INST, "cell_lab")], officer=qa)
    add_user(settings, "cc_tech2", "Lu Tech", PASSWORD, [(INST, "cell_lab")], officer=qa)
    for user in ("cc_adm", "cc_rev", "qa"):
        grant_training(settings, user, INST, "change_control", 1, trainer="Test Trainer", officer=qa)

    # v1: through change control; issued, not yet effective: no run may start.
    cc1 = _change(settings, tmp_path, 1, 100, timedelta(days=1))
    with read_session(settings.database_url) as s:
        tech = s.exec(select(User).where(User.username == "cc_tech")).one()
        assigned = s.exec(
            select(TrainingAssignment).where(
                TrainingAssignment.user_id == tech.id, TrainingAssignment.sop_id == "cc_probe"
            )
        ).all()
        meanings = [
            sig.meaning
            for sig in s.exec(select(Signature).where(Signature.run_id == cc1).order_by(col(Signature.signed_at)))
        ]
    assert [(a.sop_version, a.roles_json) for a in assigned] == [(1, '["cell_lab"]')]
    assert _issued_notice(settings), "the staff who must train were not told that v1 was issued"
    assert meanings[0] == "performed"
    assert meanings[-2:] == ["reviewed", "approved"]
    mark = _head(settings)
    with pytest.raises(SopNotEffectiveError, match=r"cc_probe has no Effective version.*v1 is issued \(effective from"):
        runs_service.start_run(settings, INST, "cc_probe", {"lot": "LOT-1"}, "qm", PASSWORD)
    assert [e.action for e in _refusals(settings, mark)] == ["run.start.refused"]
    overdue = service_overdue(settings)
    assert ("cc_tech", 1) in overdue  # assigned with a zero-day window, not yet trained

    # Issue 15: its date has come, but nobody holding cell_lab is trained on v1: it waits, Issued,
    # the reason is listed, and QA and the administrators are told once (not at every sweep).
    late = utcnow() + timedelta(days=2)
    first = sweep(settings, now=late)
    assert (first["effective"], first["coverage_waits"]) == (0, 1)
    assert sweep(settings, now=late)["coverage_waits"] == 0
    assert _states(settings) == {1: "issued"}
    (listed,) = list_versions(settings, INST, "cc_probe")
    assert "cc_probe v1 waits to become effective" in listed["waiting"]
    assert "cell_lab: 0/1" in listed["waiting"]
    assert {r["role"]: (r["trained"], r["needed"]) for r in listed["coverage"]}["cell_lab"] == (0, 1)
    told = _outbox(settings, "reminder:coverage_wait:")
    assert len(told) == 1
    assert set(json.loads(told[0].roles_json)) == {"qa", "sop_admin"}
    assert "cell_lab: 0/1" in told[0].body
    cov = coverage_rows(settings, INST)
    assert {(c["sop_id"], c["sop_version"], c["role"]): (c["trained"], c["needed"]) for c in cov}[
        ("cc_probe", 1, "cell_lab")
    ] == (0, 1)
    with pytest.raises(SopNotEffectiveError, match=r"v1 is issued .*; it waits: cc_probe v1 waits to become effective"):
        runs_service.start_run(settings, INST, "cc_probe", {"lot": "LOT-1"}, "qm", PASSWORD)
    from flows.web import create_app
    from tests.test_web import login

    page = login(create_app(settings), "qa").get(f"/sops/{INST}/cc_probe").text
    assert 'id="waiting-v1"' in page
    assert "cc_probe v1 waits to become effective" in page
    assert "cell_lab: 0/1" in page
    # Once someone is trained, the next sweep makes it Effective.
    grant_training(settings, "cc_tech", INST, "cc_probe", 1, trainer="Test Trainer", officer=qa)
    assert sweep(settings, now=late)["effective"] == 1
    assert _states(settings) == {1: "effective"}
    assert len(_outbox(settings, "reminder:coverage_wait:")) == 1

    # Run A starts on v1; the signer must be trained on v1 (cc_tech2 holds the role, untrained).
    run_a = runs_service.start_run(settings, INST, "cc_probe", {"lot": "LOT-A"}, "qm", PASSWORD)
    assert run_a.sop_version == 1
    wait_for(settings, run_a.run_id, step="measure")
    mark = _head(settings)
    with pytest.raises(NotAuthorizedError, match="not trained on cc_probe v1"):
        signing_service.submit_step(settings, run_a.run_id, "measure", "cc_tech2", PASSWORD, {"value": "50"})
    assert [e.action for e in _refusals(settings, mark)] == ["sign.refused"]

    # v2 (limit 80) becomes effective while run A waits (cc_tech2 is trained on it; cc_tech is not).
    _change(settings, tmp_path, 2, 80, timedelta(days=3))
    grant_training(settings, "cc_tech2", INST, "cc_probe", 2, trainer="Test Trainer", officer=qa)
    assert sweep(settings, now=utcnow() + timedelta(days=4))["effective"] == 1
    assert _states(settings) == {1: "superseded", 2: "effective"}
    run_b = runs_service.start_run(settings, INST, "cc_probe", {"lot": "LOT-B"}, "qm", PASSWORD)
    assert run_b.sop_version == 2

    # Run A finishes on v1 (its limit 100 applies; cc_tech is trained on v1).
    signing_service.submit_step(settings, run_a.run_id, "measure", "cc_tech", PASSWORD, {"value": "90"})
    rec_a = wait_for(settings, run_a.run_id, statuses=("completed",))
    assert rec_a["run"]["sop_version"] == 1
    # Run B uses v2: its limit 80, and training on v2.
    wait_for(settings, run_b.run_id, step="measure")
    with pytest.raises(NotAuthorizedError, match="not trained on cc_probe v2"):
        signing_service.submit_step(settings, run_b.run_id, "measure", "cc_tech", PASSWORD, {"value": "50"})
    grant_training(settings, "cc_tech", INST, "cc_probe", 2, trainer="Test Trainer", officer=qa)
    from flows.errors import SopInputError

    with pytest.raises(SopInputError, match="80"):
        signing_service.submit_step(settings, run_b.run_id, "measure", "cc_tech", PASSWORD, {"value": "90"})
    signing_service.submit_step(settings, run_b.run_id, "measure", "cc_tech", PASSWORD, {"value": "70"})
    rec_b = wait_for(settings, run_b.run_id, statuses=("completed",))
    assert rec_b["run"]["sop_version"] == 2

    # v3, rejected at review: the version is rejected, v2 stays in force, the number is spent.
    path = tmp_path / "cc_probe.yaml"
    path.write_text(PROBE.format(version=3, limit=10), encoding="utf-8")
    create_draft(settings, INST, path.read_text(encoding="utf-8"), name=str(path), username="cc_adm", password=PASSWORD)
    cc3 = submit_change(
        settings, INST, "cc_probe", 3, reviewer="cc_rev", reason="limit 10", username="cc_adm", password=PASSWORD
    )
    wait_for(settings, cc3, step="review")
    signing_service.submit_step(
        settings, cc3, "review", "cc_rev", PASSWORD, {"decision": "reject", "reason": "10 is below the label's range"}
    )
    wait_for(settings, cc3, statuses=("rejected",))
    sweep(settings)
    assert _states(settings) == {1: "superseded", 2: "effective", 3: "rejected"}
    assert audit_service.verify_audit(settings).ok


def _outbox(settings, prefix: str) -> list[OutboxMessage]:
    with read_session(settings.database_url) as s:
        return list(s.exec(select(OutboxMessage).where(col(OutboxMessage.key).startswith(prefix))))


def service_overdue(settings) -> set[tuple[str, int]]:
    from flows.services.training import overdue_training

    return {(o["username"], o["sop_version"]) for o in overdue_training(settings, now=utcnow() + timedelta(days=2))}


def _issued_notice(settings) -> bool:
    """Whether the "issued" reminder of cc_probe was recorded (by this test's sweep or the executor's)."""
    from flows.record.tables import Reminder, SopVersion

    def told() -> bool:
        with read_session(settings.database_url) as s:
            ids = set(s.exec(select(SopVersion.id).where(SopVersion.sop_id == "cc_probe")))
            return any(r.object_id in ids for r in s.exec(select(Reminder).where(Reminder.kind == "issued")))

    return eventually(told, "no 'issued' reminder of cc_probe was recorded")
