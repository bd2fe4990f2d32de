"""Stage 3: where deadlines stand, read from a real record (SQLite and PostgreSQL), with a fixed clock."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from sqlmodel import select

from flows.engine.deadlines import sweep_deadlines
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.deadlines import deadline_states
from flows.record.tables import Deviation, SopRun, SopVersion, new_id
from flows.sop.model import SopDefinition
from tests.conftest import FIXED_AT, MakeRun

SOP_TEXT = (Path(__file__).parent / "sops" / "engine" / "lang_hospital" / "lang_deadline.yaml").read_text(
    encoding="utf-8"
)
SOP = SopDefinition.model_validate(yaml.safe_load(SOP_TEXT))


def _run(s, make_run: MakeRun, product: dict | None) -> tuple[str, object]:
    """A run of lang_deadline (``product`` as its stored catalogue entry) and the factory's helpers."""
    made = make_run(s)
    version = SopVersion(
        institution="demo_hospital",
        sop_id=SOP.id,
        version=1,
        schema_version=1,
        sha256=ledger.sha256_hex(SOP_TEXT.encode()),
        text=SOP_TEXT,
        stored_at=FIXED_AT,
    )
    ledger.append(s, version, actor="system")
    run = SopRun(
        institution="demo_hospital",
        sop_version_id=version.id,
        sop_id=SOP.id,
        sop_version=1,
        sop_sha256=version.sha256,
        schema_version=1,
        params_json=json.dumps({"product": "p"}),
        product_json=json.dumps(product) if product else None,
        flow_run_id=new_id(),
        started_by=made.run.started_by,
        started_at=FIXED_AT,
    )
    ledger.append(s, run, actor="system")
    return run.id, dataclasses.replace(made, run=run, sop=SOP)


def _states(db_url: str, run_id: str, now) -> dict[str, dict]:
    with read_session(db_url) as s:
        return {d["id"]: d for d in deadline_states(s, s.get(SopRun, run_id), SOP, now)}


def test_deadline_states_from_pending_to_overdue(db_url, make_run):
    with write_session(db_url) as s:
        run, made = _run(s, make_run, {"name": "P", "mah": "M", "thaw_to_infusion_max_min": 30})
        assert deadline_states(s, s.get(SopRun, run), SOP, FIXED_AT)[0]["state"] == "pending"
        made.record(s, "thaw", "done", {"thaw_end": FIXED_AT.isoformat()}, user="ana", sign=True, at=FIXED_AT)

    running = _states(db_url, run, FIXED_AT + timedelta(minutes=10))["thaw_to_infusion_end"]
    overdue = _states(db_url, run, FIXED_AT + timedelta(minutes=31))["thaw_to_infusion_end"]

    assert (running["state"], running["seconds_left"], running["due_at"]) == (
        "running",
        1200.0,
        "2026-11-02T02:00:00+00:00",
    )
    assert (overdue["state"], overdue["seconds_left"]) == ("overdue", -60.0)


def test_deadline_without_a_limit_for_the_product_is_invalid_and_opens_nothing(db_url, make_run, tmp_path):
    from flows.config import get_settings

    with write_session(db_url) as s:
        run, made = _run(s, make_run, {"name": "P", "mah": "M"})
        made.record(s, "thaw", "done", {"thaw_end": FIXED_AT.isoformat()}, user="ana", sign=True, at=FIXED_AT)
    settings = dataclasses.replace(get_settings(), database_url=db_url, notify_config=tmp_path / "none.yaml")

    entry = _states(db_url, run, FIXED_AT + timedelta(days=2))["thaw_to_infusion_end"]
    opened = sweep_deadlines(settings, now=FIXED_AT + timedelta(days=2))

    assert entry["state"] == "invalid"
    assert entry["problem"] == (
        "within_min 'product.thaw_to_infusion_max_min' failed: 'product' has no value 'thaw_to_infusion_max_min'"
    )
    assert opened == 1  # only signed_within_a_day (1d) is past due
    with read_session(db_url) as s:
        assert [d.step_id for d in s.exec(select(Deviation).where(Deviation.run_id == run))] == ["signed_within_a_day"]


def test_deadline_end_skipped_is_not_applicable_and_a_correction_does_not_move_a_signing_time(db_url, make_run):
    with write_session(db_url) as s:
        run, made = _run(s, make_run, {"name": "P", "mah": "M", "thaw_to_infusion_max_min": 30})
        first = made.record(s, "thaw", "done", {"thaw_end": FIXED_AT.isoformat()}, user="ana", sign=True, at=FIXED_AT)
        made.record(
            s,
            "thaw",
            "done",
            {"thaw_end": (FIXED_AT + timedelta(minutes=5)).isoformat()},
            user="ana",
            sign=True,
            supersedes=first,
            reason="typo",
            at=FIXED_AT + timedelta(hours=3),
        )
        made.record(s, "infusion", "skipped", {"when": "false", "value": False})

    states = _states(db_url, run, FIXED_AT + timedelta(hours=4))

    assert states["thaw_to_infusion_end"]["state"] == "not_applicable"
    assert states["thaw_to_infusion_end"]["from_at"] == "2026-11-02T01:35:00+00:00"  # the corrected value
    assert states["signed_within_a_day"]["from_at"] == "2026-11-02T01:30:00+00:00"  # signed then, not at the correction


def test_start_refuses_a_deadline_whose_limit_the_product_does_not_give(tmp_path):
    """Refused before anyone signs in or any run is written: a deadline nobody can measure."""
    from flows.config import get_settings
    from flows.errors import SopInputError
    from flows.record.db import read_session
    from flows.record.tables import AuditEvent, SopRun
    from flows.services import runs as runs_service
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.versions import establish

    settings = dataclasses.replace(
        get_settings(),
        sops_dir=Path(__file__).parent / "sops" / "engine",
        database_url=f"sqlite:///{tmp_path / 'lang.db'}",
    )
    add_user(settings, "qa1", "Q A", "test-password-1", [("lang_hospital", "qa")])  # the first account
    establish(settings, "lang_hospital", Officer("qa1", "test-password-1"))
    with read_session(settings.database_url) as s:
        before = len(s.exec(select(AuditEvent)).all())
    with pytest.raises(SopInputError) as info:
        runs_service.start_run(settings, "lang_hospital", "lang_deadline", {"product": "noclock"}, "qa1", "unused")

    assert info.value.problems == [
        "lang_deadline deadlines.thaw_to_infusion_end: no time limit for this run: within_min "
        "'product.thaw_to_infusion_max_min' gives None, not a number of minutes; set the value in "
        "sops/lang_hospital/products.yaml"
    ]
    with read_session(settings.database_url) as s:
        assert s.exec(select(SopRun)).all() == []
        assert len(s.exec(select(AuditEvent)).all()) == before  # not even a sign-in attempt
