"""``sop submit`` refused: nothing half-done (issue 14). An administrator who may not sign the
submission (not trained on the built-in change-control SOP) is refused before any change-control
run starts, the refusal is audited, and the version stays a Draft."""

from __future__ import annotations

import json

import pytest
from sqlmodel import col, select

from flows.errors import NotAuthorizedError
from flows.record.db import read_session
from flows.record.tables import AuditEvent, SopRun
from flows.record.versions import versions_of
from flows.services.accounts import add_user
from flows.services.drafts import create_draft, submit_change
from flows.services.guard import Officer
from tests.fixtures_engine import PASSWORD

pytestmark = pytest.mark.slow

TEXT = """# Owner: test · Approval: none · Effective: when change control says
schema_version: 1
id: cc_untrained
title: Untrained submission probe
version: 2
steps:
  - id: measure
    kind: record
    role: cell_lab
    meaning: Measured it
    fields:
      value: {type: number, min: 0, max: 10}
"""


def test_submit_by_an_author_not_trained_on_change_control_starts_nothing(engine):
    qa = Officer("qa", PASSWORD)
    add_user(engine, "cc_un_adm", "Un Trained", PASSWORD, [("demo_hospital", "sop_admin")], officer=qa)
    add_user(engine, "cc_un_rev", "Re Viewer", PASSWORD, [("demo_hospital", "sop_reviewer")], officer=qa)
    create_draft(engine, "demo_hospital", TEXT, name="cc_untrained.yaml", username="cc_un_adm", password=PASSWORD)

    with pytest.raises(NotAuthorizedError, match="not trained on change_control v1") as info:
        submit_change(
            engine,
            "demo_hospital",
            "cc_untrained",
            2,
            reviewer="cc_un_rev",
            reason="probe",
            username="cc_un_adm",
            password=PASSWORD,
        )

    assert "sopflow training grant cc_un_adm --institution demo_hospital --sop change_control" in str(info.value)
    with read_session(engine.database_url) as s:
        states = {i.version.version: i.state for i in versions_of(s, "demo_hospital", "cc_untrained")}
        started = [
            r
            for r in s.exec(select(SopRun).where(SopRun.sop_id == "change_control"))
            if json.loads(r.params_json).get("sop_id") == "cc_untrained"
        ]
        refused = s.exec(
            select(AuditEvent).where(AuditEvent.action == "sop.submit.refused").order_by(col(AuditEvent.seq).desc())
        ).first()
    assert states == {2: "draft"}
    assert started == []
    assert refused is not None
    assert refused.object_id == "demo_hospital/cc_untrained"
