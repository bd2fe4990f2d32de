"""Issue 15 part 4: a deviation raised by hand, from the CLI and from the run's page, on a real run
of the real engine (Prefect server + executor); a major one holds the run's completion until QA signs
its disposition, a minor one does not. Who may raise one is the guard's (``guard.deviation_problem``):
a refusal is audited and writes nothing. The deadline's hold is tested in test_engine_language.py."""

from __future__ import annotations

import os
import re

import pytest
from sqlmodel import col, select

from flows.config import Settings
from flows.record.db import read_session
from flows.record.deviations import hold_step_id
from flows.record.tables import AuditEvent, Deviation, User
from flows.services import runs as runs_service
from tests.fixtures_engine import PASSWORD, wait_for
from tests.test_cli import cli, ok
from tests.test_web import audit_since, csrf_of, login, state

pytestmark = pytest.mark.slow

INST = "lang_hospital"
STAFF = {"h_tech": "cell_lab", "h_doc": "physician", "h_qm": "quality_manager", "h_qa": "qa"}


@pytest.fixture(name="held", scope="module")
def held_fixture(engine: Settings) -> Settings:
    """lang_hospital's staff for these tests, trained on lang_when (the physician signs; QA signs a hold)."""
    from tests.seed import seed_training, seed_user

    for username, role in STAFF.items():
        seed_user(engine, username, username.replace("_", " ").title(), PASSWORD, [(INST, role)])
    for username in ("h_doc", "h_qa"):
        seed_training(engine, username, INST, "lang_when", 1)
    return engine


def _raised(settings: Settings, run_id: str) -> list[Deviation]:
    with read_session(settings.database_url) as s:
        return list(
            s.exec(
                select(Deviation)
                .where(Deviation.run_id == run_id, Deviation.step_id == "raised_by_hand")
                .order_by(col(Deviation.opened_at))
            )
        )


def _actor(settings: Settings, deviation_id: str) -> str:
    with read_session(settings.database_url) as s:
        ev = s.exec(
            select(AuditEvent).where(AuditEvent.action == "deviation.open", AuditEvent.object_id == deviation_id)
        ).one()
        return s.exec(select(User.username).where(User.id == ev.actor)).one()


def test_deviation_raised_by_hand_from_cli_and_web_and_a_major_one_holds_the_run(held: Settings) -> None:
    from flows.web import create_app

    settings = held
    env = dict(os.environ)
    run_id = runs_service.start_run(settings, INST, "lang_when", {}, "h_qm", PASSWORD).run_id
    wait_for(settings, run_id, step="assess")
    mark = state(settings, run_id)[2]

    # Refused, with the rule in words and no traceback; audited; nothing written.
    stranger = cli(env, "deviation", "raise", "--run", run_id, "--class", "major", "--reason", "x", "--as", "tech")
    assert stranger.returncode == 1
    # Someone with no role at the run's institution learns nothing of the run (guard.NO_SUCH_RUN, issue 15
    # part 8); the refusal is still audited.
    assert "no such run among the runs you may read" in stranger.stderr
    assert "Traceback" not in stranger.stdout + stranger.stderr
    bad = cli(env, "deviation", "raise", "--run", run_id, "--class", "severe", "--reason", "x", "--as", "h_tech")
    assert bad.returncode == 1
    assert "classification 'severe': expected minor, major or critical" in bad.stderr
    quarantine = cli(
        env,
        "deviation",
        "raise",
        "--run",
        run_id,
        "--class",
        "major",
        "--reason",
        "x",
        "--quarantine",
        "--as",
        "h_tech",
    )
    assert quarantine.returncode == 1
    assert "may not quarantine a dose at 'lang_hospital': that takes role 'qa' there" in quarantine.stderr
    neither = cli(env, "deviation", "raise", "--class", "major", "--reason", "x", "--as", "h_tech")
    assert neither.returncode != 0
    assert "name the run (--run ID) or the dose (--coi COI)" in neither.stderr
    assert _raised(settings, run_id) == []
    # The stranger's refusal and the quarantine's, each by who asked.
    assert audit_since(settings, mark, "tech").count("deviation.raise.refused") == 1
    assert audit_since(settings, mark, "h_tech").count("deviation.raise.refused") == 1

    # From the CLI: a major one, signed in as the reporter (a run-id prefix, as elsewhere in the CLI).
    out = ok(
        cli(
            env,
            "deviation",
            "raise",
            "--run",
            run_id[:8],
            "--class",
            "major",
            "--reason",
            "Patient wristband unreadable at assessment",
            "--as",
            "h_tech",
        )
    )
    [major] = _raised(settings, run_id)
    assert f"deviation {major.id} raised on run {run_id[:8]} (major)" in out
    assert "cannot complete, nor release its dose, until the deviation's disposition is signed" in out
    assert (major.classification, major.description) == ("major", "Patient wristband unreadable at assessment")
    assert _actor(settings, major.id) == "h_tech"

    # From the web, on the run's page: a minor one (it does not hold the run).
    app = create_app(settings)
    doc = login(app, "h_doc")
    page = doc.get(f"/runs/{run_id}").text
    assert f'href="/deviations/new?run={run_id}"' in page
    csrf = csrf_of(doc.get(f"/deviations/new?run={run_id}").text)
    form = {"csrf": csrf, "run": run_id, "classification": "minor", "description": "Form printed on old paper"}
    assert doc.post("/deviations/new", data={**form, "password": "wrong"}).status_code == 401
    r = doc.post("/deviations/new", data={**form, "password": PASSWORD})
    assert r.status_code == 303
    minor = next(d for d in _raised(settings, run_id) if d.classification == "minor")
    assert r.headers["location"].endswith(f"/deviations/{minor.id}")
    assert _actor(settings, minor.id) == "h_doc"

    # The last step is signed; the run does not complete: the major deviation holds it, QA is asked.
    ok(cli(env, "submit", run_id, "assess", "--set", "fever=no", "--as", "h_doc"))
    hold = hold_step_id(major.id)
    rec = wait_for(settings, run_id, step=hold)
    assert rec["run"]["status"] == "waiting"
    listed = ok(cli(env, "runs"))
    line = next(ln for ln in listed.splitlines() if ln.startswith(run_id))
    assert f"held: major deviation {major.id[:8]}" in line
    held_page = doc.get(f"/runs/{run_id}").text
    assert 'id="held"' in held_page
    assert "Patient wristband unreadable at assessment" in held_page
    inbox = ok(cli(env, "inbox", "--as", "h_qa"))
    assert hold in inbox
    refused = cli(env, "submit", run_id, hold, "--set", "decision=approve", "--as", "h_doc")
    assert refused.returncode == 1
    assert f"step '{hold}' may only be signed by role 'qa'" in refused.stderr
    assert runs_service.quality_record(settings, run_id)["run"]["status"] == "waiting"

    # QA signs the disposition: the run completes; the minor one never held it.
    ok(cli(env, "submit", run_id, hold, "--set", "decision=approve", "--set", "reason=re-identified", "--as", "h_qa"))
    rec = wait_for(settings, run_id, statuses=("completed", "rejected", "stopped"))
    assert rec["run"]["status"] == "completed"
    devs = {d["id"]: d for d in rec["deviations"]}
    assert devs[major.id]["status"] == "dispositioned"
    assert devs[minor.id]["status"] == "open"
    steps = {s["id"]: s for s in rec["steps"]}
    assert steps[hold]["status"] == "done"
    assert steps[hold]["signature"]["user"] == "h_qa"
    assert hold_step_id(minor.id) not in steps


def test_deviation_raise_on_an_unknown_dose_says_so(held: Settings) -> None:
    proc = cli(
        dict(os.environ),
        "deviation",
        "raise",
        "--coi",
        "NO-SUCH-COI",
        "--class",
        "minor",
        "--reason",
        "x",
        "--as",
        "h_tech",
    )
    assert proc.returncode == 1
    assert "no run carries COI 'NO-SUCH-COI'" in proc.stderr
    assert re.search(r"Traceback", proc.stdout + proc.stderr) is None


def test_hold_waits_for_the_handling_runs_disposition_and_a_reject_ends_the_run_rejected(engine: Settings) -> None:
    """A deviation raised by hand at an institution with a deviation SOP is handled by a run of it:
    the run it was raised on waits at its last step for that run's disposition (no second,
    inline one), and a disposition that rejects the dose ends the run rejected, never completed."""
    from flows.services import deviations as deviation_service
    from flows.services import signing as signing_service
    from tests.seed import seed_training, seed_user

    inst = "dev_hospital"
    for username, role in (("hd_tech", "cell_lab"), ("hd_qa", "qa")):
        seed_user(engine, username, username.replace("_", " ").title(), PASSWORD, [(inst, role)])
        for sop in ("receipt", "deviation_capa"):
            seed_training(engine, username, inst, sop, 1)
    run_id = runs_service.start_run(engine, inst, "receipt", {"coi": "COI-HOLD-0001"}, "hd_tech", PASSWORD).run_id
    wait_for(engine, run_id, step="arrival")
    res = deviation_service.raise_deviation(
        engine,
        username="hd_tech",
        password=PASSWORD,
        classification="critical",
        description="Cassette label torn: identity cannot be read in full",
        coi="COI-HOLD-0001",
    )
    assert res["run_id"] == run_id
    handler = res["handling_run_id"]
    assert handler, res["handling_problem"]

    signing_service.submit_step(engine, run_id, "arrival", "hd_tech", PASSWORD, {"logger_max_c": "-180"})
    wait_for(engine, run_id, step="put_away")
    signing_service.submit_step(engine, run_id, "put_away", "hd_tech", PASSWORD, {"position": "T1-A3"})
    link = f"{hold_step_id(res['deviation_id'])}__handling"
    rec = wait_for(engine, run_id, step=link)
    assert rec["run"]["status"] == "waiting"
    assert hold_step_id(res["deviation_id"]) not in {s["id"] for s in rec["steps"]}  # no inline disposition

    wait_for(engine, handler, step="containment")
    signing_service.submit_step(engine, handler, "containment", "hd_qa", PASSWORD, {"action": "dose set aside"})
    wait_for(engine, handler, step="disposition")
    signing_service.submit_step(
        engine, handler, "disposition", "hd_qa", PASSWORD, {"outcome": "destroy", "rationale": "identity unproven"}
    )
    rec = wait_for(engine, run_id, statuses=("completed", "rejected", "stopped"))
    assert rec["run"]["status"] == "rejected"
    assert "disposition: reject" in rec["run"]["status_detail"]
