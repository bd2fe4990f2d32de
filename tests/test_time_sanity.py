"""Issue 15 part 5: time sanity through the real submit path (service and CLI) on a real run of the
real engine: a recorded time more than SOPFLOW_FUTURE_SKEW_MINUTES (default 5) ahead of the clock is
refused, and so is one before the run started unless the field says ``before_start: allowed``; each
refusal says why and writes nothing. The rules themselves are unit-tested in test_sop_normalize.py."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import pytest

from flows.config import Settings
from flows.errors import SopInputError
from flows.record.db import read_session
from flows.record.tables import SopRun, utcnow
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from tests.fixtures_engine import PASSWORD, wait_for
from tests.test_cli import cli, ok
from tests.test_web import state

pytestmark = pytest.mark.slow

INST = "lang_hospital"


@pytest.fixture(name="clock", scope="module")
def clock_fixture(engine: Settings) -> Settings:
    from tests.seed import seed_training, seed_user

    seed_user(engine, "t_doc", "T Doc", PASSWORD, [(INST, "physician")])
    seed_user(engine, "t_qm", "T Qm", PASSWORD, [(INST, "quality_manager")])
    seed_training(engine, "t_doc", INST, "lang_time", 1)
    return engine


def _start(settings: Settings) -> tuple[str, object]:
    run_id = runs_service.start_run(settings, INST, "lang_time", {}, "t_qm", PASSWORD).run_id
    wait_for(settings, run_id, step="bedside")
    with read_session(settings.database_url) as s:
        run = s.get(SopRun, run_id)
        assert run is not None
        return run_id, run.started_at


def test_submit_refuses_a_time_in_the_future_beyond_the_skew_and_one_before_the_run(clock: Settings) -> None:
    settings = clock
    assert settings.future_skew_minutes == 5  # the default
    run_id, started = _start(settings)
    before = state(settings, run_id)

    ahead = (utcnow() + timedelta(minutes=10)).isoformat()
    with pytest.raises(SopInputError, match="future") as future:
        signing_service.submit_step(settings, run_id, "bedside", "t_doc", PASSWORD, {"done_at": ahead})
    assert "step 'bedside': done_at:" in str(future.value)
    assert "in the future" in str(future.value)
    assert "a recorded time may be at most 5 min ahead: check the date, the time and the offset" in str(future.value)

    early = (started - timedelta(hours=1)).isoformat()  # type: ignore[operator]
    with pytest.raises(SopInputError, match="before the run started") as past:
        signing_service.submit_step(settings, run_id, "bedside", "t_doc", PASSWORD, {"done_at": early})
    assert "this field records a time during the run" in str(past.value)
    assert "'before_start: allowed'" in str(past.value)
    assert state(settings, run_id)[:2] == before[:2]  # refused: no step record, no signature

    # Within the skew it is accepted; the field that allows an earlier time takes one.
    res = signing_service.submit_step(
        settings,
        run_id,
        "bedside",
        "t_doc",
        PASSWORD,
        {"done_at": (utcnow() + timedelta(minutes=2)).isoformat(), "noticed_at": early},
    )
    rec = wait_for(settings, run_id, statuses=("completed",))
    data = {s["id"]: s for s in rec["steps"]}["bedside"]["data"]
    assert data["noticed_at"] == (started - timedelta(hours=1)).isoformat()  # type: ignore[operator]
    assert res.step_id == "bedside"


def test_future_skew_is_configurable_and_the_cli_says_why(clock: Settings) -> None:
    run_id, _ = _start(clock)
    env = {**os.environ, "SOPFLOW_FUTURE_SKEW_MINUTES": "0"}
    soon = (utcnow() + timedelta(minutes=2)).isoformat()
    proc = cli(env, "submit", run_id, "bedside", "--set", f"done_at={soon}", "--as", "t_doc")
    assert proc.returncode == 1
    assert "in the future" in proc.stderr
    assert "a recorded time may be at most 0 min ahead" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # A wider skew (SOPFLOW_FUTURE_SKEW_MINUTES=30) takes a time 10 minutes ahead.
    wider = dataclasses.replace(clock, future_skew_minutes=30)
    later = (utcnow() + timedelta(minutes=10)).isoformat()
    ok(
        cli(
            {**os.environ, "SOPFLOW_FUTURE_SKEW_MINUTES": "30"},
            "submit",
            run_id,
            "bedside",
            "--set",
            f"done_at={later}",
            "--set",
            f"noticed_at={later}",
            "--as",
            "t_doc",
        )
    )
    assert wait_for(wider, run_id, statuses=("completed",))["run"]["status"] == "completed"
