"""The SOP-language additions for real: a local Prefect server, the executor, signed input.

The SOPs are in tests/sops/lang/demo_hospital/ (the demo institution's roles, so the engine
fixture's staff can sign them); each test trains its signers on the SOP it runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flows import service
from flows.config import Settings
from flows.errors import SopInputError
from tests.fixtures_engine import PASSWORD, sign, wait_for

pytestmark = pytest.mark.slow

LANG_SOPS = Path(__file__).parent / "sops" / "lang"
_TRAINED: set[str] = set()


@pytest.fixture(name="lang")
def lang_fixture(engine: Settings) -> Settings:
    """The engine's settings with the SOP-language test SOPs; every staff member trained on them."""
    return dataclasses.replace(engine, sops_dir=LANG_SOPS)


def _start(settings: Settings, sop_id: str, params: dict[str, str] | None = None) -> str:
    from flows.admin import grant_training
    from tests.fixtures_engine import DEMO_STAFF

    if sop_id not in _TRAINED:
        for username in DEMO_STAFF:
            grant_training(settings, username, "demo_hospital", sop_id, 1, trainer="Test Trainer")
        _TRAINED.add(sop_id)
    return service.start_run(settings, "demo_hospital", sop_id, params or {}, "qm", PASSWORD).run_id


def _steps(rec: dict) -> dict[str, dict]:
    return {s["id"]: s for s in rec["steps"]}


def test_computed_values_are_previewed_signed_and_stored(lang):
    run_id = _start(lang, "lang_compute", {"product": "tecartus", "coi": "KT-2026-000117"})
    wait_for(lang, run_id, step="assess")
    entered = {"weight_kg": "25", "fever": "yes", "hypotension": "no_pressors", "hypoxia": "high_flow"}

    preview = service.preview_step(lang, run_id, "assess", entered)
    assert preview["computed"] == {"crs_grade": 3.0, "toci_mg": 300.0}
    with pytest.raises(SopInputError, match="toci_mg: is computed"):
        service.submit_step(lang, run_id, "assess", "doc", PASSWORD, {**entered, "toci_mg": "200"})
    result = service.submit_step(lang, run_id, "assess", "doc", PASSWORD, entered)
    assert result.computed == {"crs_grade": 3.0, "toci_mg": 300.0}

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))
    assert rec["run"]["status"] == "completed"
    steps = _steps(rec)
    assert steps["assess"]["data"] == {"weight_kg": 25.0, "fever": True, "hypotension": "no_pressors",
                                       "hypoxia": "high_flow", "crs_grade": 3.0, "toci_mg": 300.0}
    assert steps["assess"]["signature"]["valid"]
    assert steps["grade_recorded"]["data"]["passed"] is True


def test_coi_param_is_checked_against_the_products_pattern_at_start(lang):
    with pytest.raises(SopInputError, match="is not a chain-of-identity id of product 'tecartus'"):
        _start(lang, "lang_compute", {"product": "tecartus", "coi": "COI-0001"})


def test_when_false_skips_steps_and_later_steps_read_their_fields_as_none(lang):
    run_id = _start(lang, "lang_when")
    sign(lang, run_id, "assess", "doc", {"fever": "no"})

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    assert rec["run"]["status"] == "completed"
    steps = _steps(rec)
    assert {k: v["status"] for k, v in steps.items()} == {
        "assess": "done", "give_toci": "skipped", "dose_sane": "done", "tell_pharmacy": "skipped"}
    assert steps["give_toci"]["data"] == {"when": "assess.fever", "value": False}
    assert steps["dose_sane"]["data"]["passed"] is True
    skipped = [h for h in rec["history"] if h["status"] == "skipped"]
    assert [h["step_id"] for h in skipped] == ["give_toci", "tell_pharmacy"]
    assert skipped[0]["reason"] == "'when' is false: assess.fever"
    assert any(e["action"] == "step.skipped" for e in rec["audit_events"])


def test_when_true_runs_the_step(lang):
    run_id = _start(lang, "lang_when")
    sign(lang, run_id, "assess", "doc", {"fever": "yes"})
    sign(lang, run_id, "give_toci", "doc", {"dose_mg": "560"})

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    assert {k: v["status"] for k, v in _steps(rec).items()} == {
        "assess": "done", "give_toci": "done", "dose_sane": "done", "tell_pharmacy": "done"}
    assert "Tocilizumab 560.0 mg given" in _steps(rec)["tell_pharmacy"]["data"]["message"]
