"""The SOP-language additions for real: a local Prefect server, the executor, signed input.

The SOPs are in tests/sops/engine/lang_hospital/, an institution of their own that the engine
fixture establishes (change control: a run needs an Effective version); its staff are made here and
each test trains its signers on the SOP it runs.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from flows.config import Settings
from flows.errors import NotAuthorizedError, SopInputError
from flows.record.deviations import hold_step_id
from flows.services import inbox as inbox_service
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from tests.fixtures_engine import PASSWORD, sign, wait_for
from tests.waiting import LIMIT, eventually

pytestmark = pytest.mark.slow

INST = "lang_hospital"
STAFF = {"l_tech": "cell_lab", "l_doc": "physician", "l_qm": "quality_manager", "l_qa": "qa"}
_TRAINED: set[str] = set()


@pytest.fixture(name="lang")
def lang_fixture(engine: Settings) -> Settings:
    """The engine's settings, with lang_hospital's staff (``_start`` trains the signers)."""
    from tests.seed import seed_user

    if not _TRAINED:
        for username, role in STAFF.items():
            seed_user(engine, username, username.replace("_", " ").title(), PASSWORD, [(INST, role)])
        _TRAINED.add("")
    return engine


def _start(settings: Settings, sop_id: str, params: dict[str, str] | None = None) -> str:
    from tests.seed import seed_training

    if sop_id not in _TRAINED:
        for username in ("l_tech", "l_doc", "l_qa"):  # the signers of these SOPs (QA: a held run's disposition)
            seed_training(settings, username, INST, sop_id, 1)
        _TRAINED.add(sop_id)
    return runs_service.start_run(settings, INST, sop_id, params or {}, "l_qm", PASSWORD).run_id


def _steps(rec: dict) -> dict[str, dict]:
    return {s["id"]: s for s in rec["steps"]}


def _export_problems(settings: Settings, run_id: str) -> list[str]:
    """What ``sopflow audit verify-export`` finds in the run's exported record (nothing, we hope)."""
    import json

    from flows.record.export import verify_export

    return verify_export(json.loads(json.dumps(runs_service.quality_record(settings, run_id), default=str)))


def test_computed_values_are_previewed_signed_and_stored(lang):
    run_id = _start(lang, "lang_compute", {"product": "tecartus", "coi": "KT-2026-000117"})
    wait_for(lang, run_id, step="assess")
    entered = {"weight_kg": "25", "fever": "yes", "hypotension": "no_pressors", "hypoxia": "high_flow"}

    preview = signing_service.preview_step(lang, run_id, "assess", entered)
    assert preview["computed"] == {"crs_grade": 3.0, "toci_mg": 300.0}
    with pytest.raises(SopInputError, match="toci_mg: is computed"):
        signing_service.submit_step(lang, run_id, "assess", "l_doc", PASSWORD, {**entered, "toci_mg": "200"})
    result = signing_service.submit_step(lang, run_id, "assess", "l_doc", PASSWORD, entered)
    assert result.computed == {"crs_grade": 3.0, "toci_mg": 300.0}

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))
    assert rec["run"]["status"] == "completed"
    steps = _steps(rec)
    assert steps["assess"]["data"] == {
        "weight_kg": 25.0,
        "fever": True,
        "hypotension": "no_pressors",
        "hypoxia": "high_flow",
        "crs_grade": 3.0,
        "toci_mg": 300.0,
    }
    assert steps["assess"]["signature"]["valid"]
    assert steps["grade_recorded"]["data"]["passed"] is True


def test_coi_param_is_checked_against_the_products_pattern_at_start(lang):
    with pytest.raises(SopInputError, match="is not a chain-of-identity id of product 'tecartus'"):
        _start(lang, "lang_compute", {"product": "tecartus", "coi": "COI-0001"})


def test_when_false_skips_steps_and_later_steps_read_their_fields_as_none(lang):
    run_id = _start(lang, "lang_when")
    sign(lang, run_id, "assess", "l_doc", {"fever": "no"})

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    assert rec["run"]["status"] == "completed"
    steps = _steps(rec)
    assert {k: v["status"] for k, v in steps.items()} == {
        "assess": "done",
        "give_toci": "skipped",
        "dose_sane": "done",
        "tell_pharmacy": "skipped",
    }
    assert steps["give_toci"]["data"] == {"when": "assess.fever", "value": False}
    assert steps["dose_sane"]["data"]["passed"] is True
    skipped = [h for h in rec["history"] if h["status"] == "skipped"]
    assert [h["step_id"] for h in skipped] == ["give_toci", "tell_pharmacy"]
    assert skipped[0]["reason"] == "'when' is false: assess.fever"
    assert any(e["action"] == "step.skipped" for e in rec["audit_events"])
    assert _export_problems(lang, run_id) == []


def test_when_true_runs_the_step(lang):
    run_id = _start(lang, "lang_when")
    sign(lang, run_id, "assess", "l_doc", {"fever": "yes"})
    sign(lang, run_id, "give_toci", "l_doc", {"dose_mg": "560"})

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    assert {k: v["status"] for k, v in _steps(rec).items()} == {
        "assess": "done",
        "give_toci": "done",
        "dose_sane": "done",
        "tell_pharmacy": "done",
    }
    assert "Tocilizumab 560.0 mg given" in _steps(rec)["tell_pharmacy"]["data"]["message"]


def _at(moment) -> str:
    return moment.isoformat()


def ahead(settings: Settings) -> Settings:
    """These tests record an infusion end up to 50 minutes ahead of the real clock (the deadline's
    arithmetic needs it): a skew of an hour is configured for that one signature."""
    return dataclasses.replace(settings, future_skew_minutes=60)


def test_deadline_met_counts_down_while_running_and_shows_in_the_inbox(lang):
    from flows.record.tables import utcnow

    thaw_end = utcnow() - timedelta(minutes=10)
    run_id = _start(lang, "lang_deadline", {"product": "tecartus"})
    sign(lang, run_id, "thaw", "l_tech", {"thaw_end": _at(thaw_end)})
    rec = wait_for(lang, run_id, step="infusion")

    clock = {d["id"]: d for d in rec["deadlines"]}["thaw_to_infusion_end"]
    assert clock["state"] == "running"
    assert clock["limit_seconds"] == 30 * 60  # tecartus's thaw_to_infusion_max_min in the test catalogue
    assert clock["due_at"] == _at(thaw_end + timedelta(minutes=30))
    assert 19 * 60 < clock["seconds_left"] <= 20 * 60
    [item] = [i for i in inbox_service.inbox(lang, "l_doc") if i["run_id"] == run_id]
    assert {d["id"]: d["state"] for d in item["deadlines"]} == {
        "thaw_to_infusion_end": "running",
        "signed_within_a_day": "running",
    }
    # The web inbox shows each clock as time left and ranks the step by the nearest one.
    from flows.services.inbox import urgent_inbox

    [item] = [i for i in urgent_inbox(lang, "l_doc")[0] if i["run_id"] == run_id]
    clocks = {c["title"]: c["seconds_left"] for c in item["clocks"]}
    assert 19 * 60 < clocks[clock["title"]] <= 20 * 60
    assert item["seconds_left"] == min(clocks.values())

    sign(ahead(lang), run_id, "infusion", "l_doc", {"infusion_end": _at(thaw_end + timedelta(minutes=25))})
    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    states = {d["id"]: d for d in rec["deadlines"]}
    assert states["thaw_to_infusion_end"]["state"] == "met"
    assert states["thaw_to_infusion_end"]["elapsed_seconds"] == 25 * 60
    assert states["signed_within_a_day"]["state"] == "met"
    assert rec["deviations"] == []


def test_deadline_breached_opens_a_deviation_tells_qa_and_the_run_goes_on(lang, receiver):
    from flows.record.tables import utcnow

    thaw_end = utcnow() - timedelta(minutes=5)
    run_id = _start(lang, "lang_deadline", {"product": "tecartus"})
    sign(lang, run_id, "thaw", "l_tech", {"thaw_end": _at(thaw_end)})
    sign(ahead(lang), run_id, "infusion", "l_doc", {"infusion_end": _at(thaw_end + timedelta(minutes=41))})

    # Issue 15: the major deviation holds the run's completion until QA signs its disposition.
    rec = _held(lang, run_id)
    [dev] = rec["deviations"]
    assert (dev["kind"], dev["step_id"], dev["classification"], dev["quarantine"]) == (
        "deadline",
        "thaw_to_infusion_end",
        "major",
        False,
    )
    hold = hold_step_id(dev["id"])
    assert rec["run"]["status"] == "waiting"
    assert f"{hold}: held: major deviation {dev['id'][:8]}" in rec["run"]["status_detail"]
    assert "completes only once role 'qa' signs its disposition" in rec["run"]["status_detail"]
    asked = receiver.wait_for(lambda m: m["path"] == "/qa" and hold in m.get("message", ""), timeout=LIMIT)
    assert asked is not None, "QA was not asked for the disposition"
    with pytest.raises(NotAuthorizedError, match="may only be signed by role 'qa'"):
        signing_service.submit_step(lang, run_id, hold, "l_doc", PASSWORD, {"decision": "approve"})
    assert runs_service.quality_record(lang, run_id)["run"]["status"] == "waiting"  # still held
    sign(lang, run_id, hold, "l_qa", {"decision": "approve", "reason": "infused within the label's total time"})
    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))
    assert rec["run"]["status"] == "completed"
    [dev] = rec["deviations"]
    assert dev["status"] == "dispositioned"
    assert {s["id"]: s["status"] for s in rec["steps"]}[hold] == "done"
    assert dev["description"] == (
        "deadline 'End of thaw to end of infusion' breached: 41m from thaw.thaw_end to "
        "infusion.infusion_end, more than its limit of 30m"
    )
    assert {d["id"]: d["state"] for d in rec["deadlines"]}["thaw_to_infusion_end"] == "breached"
    assert any(e["action"] == "deviation.open" and e["object_id"] == dev["id"] for e in rec["audit_events"])
    assert _export_problems(lang, run_id) == []
    msg = receiver.wait_for(lambda m: m["path"] == "/qa" and run_id in m.get("message", ""), timeout=LIMIT)
    assert msg is not None
    assert "Deadline breached" in msg["title"]


def _held(settings: Settings, run_id: str) -> dict:
    """Wait until the run is held at a deviation's hold step; returns its record."""

    def at_hold() -> dict | None:
        rec = runs_service.quality_record(settings, run_id)
        devs = rec["deviations"]
        waiting = {s["id"] for s in rec["steps"] if s["status"] == "waiting"}
        return rec if devs and hold_step_id(devs[0]["id"]) in waiting else None

    return eventually(at_hold, f"run {run_id} was not held at its deviation's hold step")


def test_deadline_sweep_opens_the_deviation_once_when_past_due(lang):
    from flows.engine.deadlines import sweep_deadlines
    from flows.record.tables import utcnow

    thaw_end = utcnow() - timedelta(minutes=1)
    run_id = _start(lang, "lang_deadline", {"product": "tecartus"})
    sign(lang, run_id, "thaw", "l_tech", {"thaw_end": _at(thaw_end)})
    wait_for(lang, run_id, step="infusion")

    assert sweep_deadlines(lang, now=thaw_end + timedelta(minutes=29)) == 0
    assert sweep_deadlines(lang, now=thaw_end + timedelta(minutes=31)) == 1
    assert sweep_deadlines(lang, now=thaw_end + timedelta(minutes=45)) == 0
    rec = runs_service.quality_record(lang, run_id)
    [dev] = rec["deviations"]
    assert dev["description"].startswith(
        "deadline 'End of thaw to end of infusion' overdue: infusion.infusion_end "
        "not recorded within 30m of thaw.thaw_end"
    )

    sign(ahead(lang), run_id, "infusion", "l_doc", {"infusion_end": _at(thaw_end + timedelta(minutes=50))})
    rec = _held(lang, run_id)
    assert [d["id"] for d in rec["deviations"]] == [dev["id"]]  # the breach at 'to' opens no second one
    # QA rejects the dose: the held run ends rejected, never completed.
    sign(lang, run_id, hold_step_id(dev["id"]), "l_qa", {"decision": "reject", "reason": "infusion ran too late"})
    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))
    assert rec["run"]["status"] == "rejected"
    assert "disposition: reject" in rec["run"]["status_detail"]
    assert {d["id"]: d["state"] for d in rec["deadlines"]}["thaw_to_infusion_end"] == "breached"


def test_repeated_step_is_signed_per_repetition_until_its_condition_holds(lang):
    from datetime import datetime

    run_id = _start(lang, "lang_repeat")
    sign(lang, run_id, "obs#1", "l_doc", {"ice_score": "8"})
    rec = wait_for(lang, run_id, step="obs#2")

    steps = _steps(rec)
    assert steps["obs"]["status"] == "not reached"  # until its repetitions end
    assert steps["obs"]["repeat"]["done"] == 1
    assert _export_problems(lang, run_id) == []
    assert steps["obs#1"]["data"] == {"ice_score": 8.0, "icans_grade": 1.0}
    signed_at = datetime.fromisoformat(steps["obs#1"]["signature"]["signed_at"])
    due = _at(signed_at + timedelta(hours=4))
    assert steps["obs"]["repeat"]["next"] == "obs#2"
    assert steps["obs"]["repeat"]["next_due_at"] == due
    [item] = [i for i in inbox_service.inbox(lang, "l_doc") if i["run_id"] == run_id]
    assert (item["step_id"], item["title"], item["due_at"]) == ("obs#2", "ICE assessment", due)

    sign(lang, run_id, "obs#2", "l_doc", {"ice_score": "10"})
    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    steps = _steps(rec)
    assert rec["run"]["status"] == "completed"
    assert steps["obs"]["status"] == "done"
    assert steps["obs"]["data"] == {"repetitions": 2, "ended_by": "until"}
    assert steps["obs"]["repeat"]["next"] is None
    assert steps["obs#2"]["data"] == {"ice_score": 10.0, "icans_grade": 0.0}
    assert steps["obs#2"]["signature"]["valid"]
    assert "obs#3" not in steps
    assert steps["worst_recorded"]["data"]["passed"] is True

    # A repetition is corrected on its own; its computed value follows the corrected entry.
    signing_service.correct_step(lang, run_id, "obs#1", "l_doc", PASSWORD, {"ice_score": "5"}, "read the wrong sheet")
    obs1 = _steps(runs_service.quality_record(lang, run_id))["obs#1"]
    assert obs1["data"] == {"ice_score": 5.0, "icans_grade": 2.0}
    assert obs1["corrections"][0]["changes"] == {
        "ice_score": {"old": 8.0, "new": 5.0},
        "icans_grade": {"old": 1.0, "new": 2.0},
    }
    assert _export_problems(lang, run_id) == []


def test_repeated_step_without_until_ends_after_its_times(lang):
    run_id = _start(lang, "lang_repeat_times")
    sign(lang, run_id, "temp#1", "l_doc", {"temp_c": "38.2"})
    sign(lang, run_id, "temp#2", "l_doc", {"temp_c": "37.1"})

    rec = wait_for(lang, run_id, statuses=("completed", "stopped", "rejected"))

    steps = _steps(rec)
    assert rec["run"]["status"] == "completed"
    assert steps["temp"]["data"] == {"repetitions": 2, "ended_by": "times"}
    assert [s["id"] for s in rec["steps"]] == ["temp", "temp#1", "temp#2", "highest"]
    assert steps["highest"]["data"]["passed"] is True
