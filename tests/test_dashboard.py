"""The quality dashboard's figures (``flows.services.dashboard``) on a real SQLite record: a dose
received and infused counts in "days from receipt to infusion", a quarantining deviation in
"doses in quarantine" and in its month, an open run under its stage; another institution's runs
are not shown."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import yaml

from flows.config import get_settings
from flows.record import ledger
from flows.record.db import init_db, write_session
from flows.record.state import next_n
from flows.record.tables import Deviation, RunEvent, SopRun, SopVersion, new_id
from flows.record.versions import append_version_event
from flows.services.dashboard import quality_dashboard
from flows.sop.model import SopDefinition
from tests.conftest import FIXED_AT, REPO

INFUSION = REPO / "sops" / "demo_hospital" / "infusion.yaml"


def _status(session, run, status, at):
    ev = RunEvent(run_id=run.id, n=next_n(session, RunEvent, run.id), status=status, detail=None, at=at)
    ledger.append(session, ev, actor="system", action=f"run.{status}")


def _infusion_version(session, institution="demo_hospital"):
    text = INFUSION.read_text(encoding="utf-8")
    sop = SopDefinition.model_validate(yaml.safe_load(text))
    version = SopVersion(
        institution=institution,
        sop_id=sop.id,
        version=sop.version,
        schema_version=1,
        sha256=ledger.sha256_hex(text.encode()),
        text=text,
        stored_at=FIXED_AT,
    )
    ledger.append(session, version, actor="system", action="sop_version.store")
    append_version_event(session, version, "effective", actor="system", data={}, at=FIXED_AT)
    return version, sop


def _infusion_run(session, receipt, at, version_and_sop, *, institution="demo_hospital"):
    version, sop = version_and_sop
    run = SopRun(
        institution=institution,
        sop_version_id=version.id,
        sop_id=sop.id,
        sop_version=sop.version,
        sop_sha256=version.sha256,
        schema_version=1,
        params_json=receipt.params_json,
        product_json=receipt.product_json,
        flow_run_id=new_id(),
        started_by=receipt.started_by,
        started_at=at,
    )
    ledger.append(session, run, actor="system", action="run.start")
    return run


def test_dashboard_counts_a_dose_from_receipt_to_infusion_and_its_quarantine(tmp_path, make_run):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    init_db(url)
    settings = dataclasses.replace(get_settings(), database_url=url)
    with write_session(url) as s:
        made = make_run(s)
        receipt = made.run
        _status(s, receipt, "completed", FIXED_AT + timedelta(hours=2))
        infusion_sop = _infusion_version(s)
        infusion = _infusion_run(s, receipt, FIXED_AT + timedelta(days=3), infusion_sop)
        _status(s, infusion, "completed", FIXED_AT + timedelta(days=5, hours=2))
        open_run = _infusion_run(s, receipt, FIXED_AT + timedelta(days=6), infusion_sop)
        _status(s, open_run, "waiting", FIXED_AT + timedelta(days=6))
        dev = Deviation(
            run_id=open_run.id,
            step_id="raised_by_hand",
            classification="major",
            description="bag label torn",
            quarantine=True,
            opened_at=FIXED_AT + timedelta(days=6),
        )
        ledger.append(s, dev, actor="system", action="deviation.open")
        dev_id, open_id, params = dev.id, open_run.id, receipt.params_json
    board = quality_dashboard(settings, "ana", now=FIXED_AT + timedelta(days=7))
    assert board["receipt_to_infusion"] == [{"coi": "COI-2026-0001", "days": 5.0}]
    assert [d["id"] for d in board["quarantined"]] == [dev_id]
    assert [r["run_id"] for r in board["open_by_stage"]["infusion"]] == [open_id]
    assert board["open_by_stage"]["receipt"] == []
    assert board["deviations_by_month"][-1] == {"month": "2026-11", "count": 1}
    assert len(board["deviations_by_month"]) == 12
    assert json.loads(params)["coi"] == "COI-2026-0001"
