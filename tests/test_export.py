"""An exported quality record (``sopflow record RUN --json``) verified offline by the stdlib-only
``flows.record.export``: a clean export verifies; one edited by hand fails, naming what was edited."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.config import Settings, get_settings
from flows.engine.escalation import escalate_overdue
from flows.record.db import write_session
from flows.record.export import event_hash, verify_export
from flows.record.tables import Deviation
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from tests.conftest import FIXED_AT, PASSWORD, MakeRun
from tests.test_corrections import ARRIVAL

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(name="settings")
def settings_fixture(db_url: str, tmp_path: Path) -> Settings:
    return dataclasses.replace(get_settings(), database_url=db_url, notify_config=tmp_path / "no-channels.yaml")


@pytest.fixture(name="export")
def export_fixture(settings: Settings, db_url: str, make_run: MakeRun) -> dict:
    """The export of a run with a signed, accepted and corrected step, a check, a deviation and an escalation."""
    from datetime import timedelta

    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        signed = made.record(s, "arrival", "signed", ARRIVAL, user="ana", sign=True)
        made.record(s, "arrival", "done", ARRIVAL, user="ana", signature_id=signed.signature_id)
        made.record(s, "transit_temperature", "failed", {"passed": False})
        from flows.record import ledger

        ledger.append(
            s,
            Deviation(
                run_id=made.run.id,
                step_id="transit_temperature",
                classification="major",
                description="too warm",
                quarantine=True,
                opened_at=FIXED_AT,
            ),
            actor="system",
        )
        made.record(s, "qa_acceptance", "waiting", {"role": "qa"}, at=FIXED_AT)
        run_id = made.run.id
    signing_service.correct_step(
        settings, run_id, "arrival", "ana", PASSWORD, {"logger_max_c": "-175.5"}, "wrong channel"
    )
    assert escalate_overdue(settings, now=FIXED_AT + timedelta(hours=5)) == 1
    return json.loads(json.dumps(runs_service.quality_record(settings, run_id), default=str))


def _event_of(doc: dict, table: str, row_id: str) -> dict:
    return next(e for e in doc["audit_events"] if e["object_type"] == table and e["object_id"] == row_id)


def test_export_clean_record_verifies(export):
    assert verify_export(export) == []
    tables = {t for t, rows in export["rows"].items() if rows}
    assert {"sf_run", "sf_sop_version", "sf_step_record", "sf_signature", "sf_deviation", "sf_escalation"} <= tables
    assert all(
        set(e) == {"seq", "at", "actor", "action", "object_type", "object_id", "payload", "reason", "prev_hash", "hash"}
        for e in export["audit_events"]
    )
    assert not any(e["object_type"] == "sf_user" for e in export["audit_events"])  # password hashes stay home


def test_export_edited_value_in_readable_record_fails_naming_it(export):
    doc = copy.deepcopy(export)
    arrival = next(i for i, st in enumerate(doc["steps"]) if st["id"] == "arrival")
    doc["steps"][arrival]["data"]["logger_max_c"] = -190.0

    problems = verify_export(doc)

    assert problems == [
        f"steps[{arrival}] (arrival).data: says {doc['steps'][arrival]['data']!r}, the recorded row says "
        f"{export['steps'][arrival]['data']!r}"
    ]


def test_export_edited_value_in_row_fails_naming_the_row(export):
    doc = copy.deepcopy(export)
    rec = next(r for r in doc["rows"]["sf_step_record"] if r["step_id"] == "arrival" and r["supersedes_id"])
    rec["data_json"] = rec["data_json"].replace("-175.5", "-195.5")

    problems = verify_export(doc)

    assert problems[0].startswith(f"sf_step_record row {rec['id']}: differs from what audit event ")
    assert problems[0].endswith("recorded (data_json)")
    assert any(p.startswith("sf_signature row ") and "does not match the data it signed" in p for p in problems)


def test_export_edited_row_and_event_payload_fails_on_the_event_hash(export):
    doc = copy.deepcopy(export)
    dev = doc["rows"]["sf_deviation"][0]
    dev["classification"] = "minor"
    ev = _event_of(doc, "sf_deviation", dev["id"])
    ev["payload"]["row"]["classification"] = "minor"
    doc["deviations"][0]["classification"] = "minor"

    problems = verify_export(doc)

    assert problems == [f"audit event {ev['seq']}: its content does not match its hash: the event was edited"]


def test_export_with_an_event_removed_fails_naming_the_row(export):
    doc = copy.deepcopy(export)
    sig = doc["rows"]["sf_signature"][0]
    doc["audit_events"].remove(_event_of(doc, "sf_signature", sig["id"]))

    problems = verify_export(doc)

    assert (
        problems[0] == f"sf_signature row {sig['id']}: no audit event in the export records it (an event was removed)"
    )


def test_export_with_a_hash_changed_fails_naming_the_event(export):
    doc = copy.deepcopy(export)
    ev = doc["audit_events"][2]
    ev["hash"] = "f" * 64

    problems = verify_export(doc)

    assert problems[0] == f"audit event {ev['seq']}: its content does not match its hash: the event was edited"


def test_export_with_a_rehashed_event_breaks_the_link_to_the_next(export):
    doc = copy.deepcopy(export)
    pairs = [
        (a, b) for a, b in zip(doc["audit_events"], doc["audit_events"][1:], strict=False) if b["seq"] == a["seq"] + 1
    ]
    first, second = pairs[0]
    first["actor"] = "someone-else"
    first["hash"] = event_hash(first)

    problems = verify_export(doc)

    assert problems[0] == f"audit event {second['seq']}: does not follow event {first['seq']} (prev_hash differs)"


def test_export_with_a_record_and_its_event_removed_fails_on_the_gap(export):
    doc = copy.deepcopy(export)
    rec = next(r for r in doc["rows"]["sf_step_record"] if r["step_id"] == "transit_temperature")
    doc["rows"]["sf_step_record"].remove(rec)
    doc["audit_events"].remove(_event_of(doc, "sf_step_record", rec["id"]))

    problems = verify_export(doc)

    assert f"sf_step_record: position {rec['n']} is missing (a row was removed from the export)" in problems


def test_export_verify_export_command_exits_1_naming_the_first_mismatch(export, tmp_path):
    clean, edited = tmp_path / "clean.json", tmp_path / "edited.json"
    clean.write_text(json.dumps(export), encoding="utf-8")
    doc = copy.deepcopy(export)
    doc["audit_events"][0]["hash"] = "0" * 64
    edited.write_text(json.dumps(doc), encoding="utf-8")
    runner = CliRunner()

    ok = runner.invoke(app, ["audit", "verify-export", str(clean)])
    bad = runner.invoke(app, ["audit", "verify-export", str(edited)])

    assert ok.exit_code == 0
    assert "verify-export: OK" in ok.output
    assert bad.exit_code == 1
    assert f"audit event {doc['audit_events'][0]['seq']}: its content does not match its hash" in bad.output


def test_export_checker_runs_alone_on_the_standard_library(export, tmp_path):
    """An inspector copies one file: run it without site-packages and without sopflow on the path."""
    (tmp_path / "export.py").write_bytes((REPO / "flows" / "record" / "export.py").read_bytes())
    record = tmp_path / "record.json"
    record.write_text(json.dumps(export), encoding="utf-8")

    done = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "export.py"), str(record)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("verify-export: OK")
