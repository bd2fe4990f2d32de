"""The current-state tables (issue 11, ``flows.record.current``): written with every ledger append,
they agree with what the record rows say, ``audit verify`` names a row that does not, ``init_db``
fills them when a database made before them is upgraded, and the reads that use them (the inbox, the runs list,
the sweeps) cost the same whatever the finished history holds: counted in queries, not timed.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy import inspect as sa_inspect
from sqlmodel import Session, select

from flows.config import Settings, get_settings
from flows.errors import SchemaVersionError, SopInputError
from flows.record import current, ledger
from flows.record.db import get_engine, init_db, read_session, upgrade_db, write_session
from flows.record.deviations import active_quarantines, append_deviation_event, quarantine_problem
from flows.record.state import next_n, signed_but_suspended
from flows.record.tables import CurrentRun, CurrentStep, Deviation, RunEvent, SopRun, StepRecord, new_id, utcnow
from flows.services import audit, runs
from flows.services.inbox import inbox
from tests.conftest import MadeRun, MakeRun


@pytest.fixture(name="settings")
def settings_fixture(db_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("SOPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOPFLOW_DATABASE_URL", db_url)
    return get_settings()


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in rows]


def _run_like(
    s: Session,
    made: MadeRun,
    *,
    statuses: tuple[str, ...] = ("scheduled", "running", "completed"),
    steps: tuple[tuple[str, str], ...] = (),
    coi: str = "COI-2026-0001",
    product: str = "axi_cel",
    started_at: datetime | None = None,
    sop_id: str | None = None,
) -> str:
    """Another run on the made run's SOP version, with its run events and step records, through the
    ledger; returns its id."""
    base = s.get(SopRun, sa_inspect(made.run).identity[0])  # the made run, in this session
    assert base is not None
    params = {**json.loads(base.params_json), "coi": coi, "product": product}
    run = SopRun(
        institution=base.institution,
        sop_version_id=base.sop_version_id,
        sop_id=sop_id or base.sop_id,
        sop_version=base.sop_version,
        sop_sha256=base.sop_sha256,
        schema_version=base.schema_version,
        params_json=json.dumps(params, sort_keys=True),
        product_json=base.product_json,
        flow_run_id=new_id(),
        started_by=base.started_by,
        started_at=started_at or utcnow(),
    )
    ledger.append(s, run, actor="system", action="run.start")
    for i, status in enumerate(statuses, 1):
        ledger.append(s, RunEvent(run_id=run.id, n=i, status=status, at=utcnow()), actor="system")
    for step_id, status in steps:
        rec = StepRecord(
            run_id=run.id,
            n=next_n(s, StepRecord, run.id),
            step_id=step_id,
            kind=made.sop.step(step_id.partition("#")[0]).kind,
            status=status,
            data_json="{}",
            at=utcnow(),
        )
        ledger.append(s, rec, actor="system")
    return run.id


FINISHED_STEPS = (
    ("arrival", "waiting"),
    ("arrival", "done"),
    ("transit_temperature", "done"),
    ("identity_verification", "waiting"),
    ("identity_verification", "done"),
    ("qa_acceptance", "waiting"),
    ("qa_acceptance", "done"),
)


# -- the tables move with the record, and audit verify checks them -----------------------------------------


def test_current_state_follows_each_append_and_agrees_with_the_record(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        ledger.append(s, RunEvent(run_id=made.run.id, n=1, status="waiting", at=utcnow()), actor="system")
        first = made.record(s, "arrival", "waiting", {"role": "cell_lab"}).id
        made.record(s, "arrival", "refused", {})
        again = made.record(s, "arrival", "waiting", {"role": "cell_lab"}).id
        run_id = made.run.id
    with read_session(db_url) as s:
        step = s.get(CurrentStep, {"run_id": run_id, "step_id": "arrival"})
        run = s.get(CurrentRun, run_id)
        assert step is not None
        assert run is not None
        # The newest record is the state; the waiting period counts from its first waiting record.
        assert (step.status, step.record_id, step.first_waiting_id) == ("waiting", again, first)
        assert (run.status, run.open, run.coi, run.product) == ("waiting", True, "COI-2026-0001", "axi_cel")
        assert current.compare(s) == []
    with write_session(db_url) as s:
        made.run = s.get(SopRun, run_id)  # type: ignore[assignment]
        made.record(s, "arrival", "done", {"seal_intact": True})
        ledger.append(s, RunEvent(run_id=run_id, n=2, status="completed", at=utcnow()), actor="system")
    with read_session(db_url) as s:
        step, run = s.get(CurrentStep, {"run_id": run_id, "step_id": "arrival"}), s.get(CurrentRun, run_id)
        assert step is not None
        assert run is not None
        assert (step.status, run.status, run.open) == ("done", "completed", False)
        assert current.compare(s) == []


def test_quarantine_row_lives_until_the_disposition(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        dev = Deviation(
            run_id=made.run.id,
            step_id="transit_temperature",
            classification="major",
            description="too warm",
            quarantine=True,
            opened_at=utcnow(),
        )
        ledger.append(s, dev, actor="system", action="deviation.open")
        dev_id, run_id = dev.id, made.run.id
    with read_session(db_url) as s:
        assert [d.id for d in active_quarantines(s, "COI-2026-0001")] == [dev_id]
        assert active_quarantines(s, "COI-OTHER") == []
        assert "quarantined by deviation" in (quarantine_problem(s, "COI-2026-0001", run_id="someone-else") or "")
        assert current.compare(s) == []
    with write_session(db_url) as s:
        append_deviation_event(
            s,
            dev_id,
            "disposition",
            {"decision": "reject"},
            run_id=run_id,
            step_id="transit_temperature__disposition",
        )
    with read_session(db_url) as s:
        assert active_quarantines(s, "COI-2026-0001") == []
        assert current.compare(s) == []


def test_audit_verify_names_a_current_state_row_that_disagrees(
    settings: Settings, db_url: str, make_run: MakeRun, sql: Callable[..., Any]
) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        done = _run_like(s, made, steps=FINISHED_STEPS)
        run_id = made.run.id
    assert audit.verify_audit(settings).ok
    sql("UPDATE sf_current_step SET status = 'done' WHERE run_id = :r AND step_id = 'arrival'", r=run_id)
    sql("DELETE FROM sf_current_run WHERE run_id = :r", r=done)
    report = audit.verify_audit(settings)
    assert report.problems == [
        f"sf_current_run row {done}: missing: the record says it should be there "
        "(status 'completed', coi 'COI-2026-0001')",
        f"sf_current_step row {run_id}/arrival: disagrees with the record: status is 'done', the record says 'waiting'",
    ]
    # The record is the truth: rebuilding from it puts the tables right again.
    with write_session(db_url) as s:
        assert current.rebuild(s) == 2
    assert audit.verify_audit(settings).ok


def test_upgrade_fills_the_tables_of_a_database_made_before_them(
    db_url: str, make_run: MakeRun, sql: Callable[..., Any]
) -> None:
    from flows.record import db as db_module

    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        run_id = made.run.id
    # The database as revision 0003 left it: its runs recorded, no current-state tables.
    for table in ("sf_sign_in_throttle", "sf_current_quarantine", "sf_current_step", "sf_current_run"):
        sql(f"DROP TABLE {table}")
    sql("DROP INDEX ix_sf_outbox_at")
    sql("UPDATE sf_schema_version SET version_num = '0003'")
    db_module._current.discard(db_url)
    with pytest.raises(SchemaVersionError, match="is at schema revision 0003"):
        init_db(db_url)
    assert [line.split()[0] for line in upgrade_db(db_url)][:1] == ["0004"]
    with read_session(db_url) as s:
        step = s.get(CurrentStep, {"run_id": run_id, "step_id": "arrival"})
        assert step is not None
        assert step.status == "waiting"
        assert current.compare(s) == []


# -- the runs list: paged and filtered ---------------------------------------------------------------------


def test_runs_list_pages_newest_first_and_filters(settings: Settings, db_url: str, make_run: MakeRun) -> None:
    day = datetime(2026, 11, 10, 8, 0, tzinfo=UTC)
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})  # the made run: no run event yet
        done = [
            _run_like(s, made, steps=FINISHED_STEPS, coi=f"COI-2026-{10 + i:04d}", started_at=day + timedelta(hours=i))
            for i in range(5)
        ]
        waiting = _run_like(
            s,
            made,
            statuses=("scheduled", "waiting"),
            steps=(("arrival", "waiting"),),
            coi="COI-2026-0099",
            product="tecartus",
            started_at=day + timedelta(days=2),
        )
        failed = _run_like(s, made, statuses=("running", "failed"), started_at=day - timedelta(days=3), sop_id="other")
        made_id = made.run.id

    every = runs.list_runs(settings)
    assert ids(every) == [waiting, *reversed(done), failed, made_id]

    page1 = runs.runs_page(settings, runs.run_filter(per_page=3))
    page2 = runs.runs_page(settings, runs.run_filter(per_page=3, page=2))
    page3 = runs.runs_page(settings, runs.run_filter(per_page=3, page="3"))
    assert [p["more"] for p in (page1, page2, page3)] == [True, True, False]
    assert ids(page1["runs"]) + ids(page2["runs"]) + ids(page3["runs"]) == ids(every)

    def only(**kw: Any) -> list[str]:
        return ids(runs.list_runs(settings, runs.run_filter(**kw)))

    assert only(status="completed") == list(reversed(done))
    assert only(status="waiting") == [waiting]
    assert only(status="failed") == [failed]
    assert set(only(status="open")) == {made_id, waiting}  # no run event yet counts as open
    assert only(sop_id="other") == [failed]
    assert only(product="tecartus") == [waiting]
    assert only(coi="COI-2026-0012") == [done[2]]
    assert only(coi=" COI-2026-0099 ") == [waiting]
    assert only(since="2026-11-12") == [waiting]
    assert only(until="2026-11-07") == [failed, made_id]  # a day: up to its end
    assert only(since="2026-11-10", until="2026-11-10") == list(reversed(done))
    assert only(since="2026-11-10T10:00", until="2026-11-10T12:00") == [done[3], done[2]]  # a time: before it
    assert only(status="completed", coi="COI-2026-0099") == []
    row = runs.list_runs(settings, runs.run_filter(status="waiting"))[0]
    assert (row["waiting_on"], row["product"], row["coi"]) == (["arrival"], "tecartus", "COI-2026-0099")


def test_runs_filter_names_each_bad_value() -> None:
    with pytest.raises(SopInputError) as info:
        runs.run_filter(status="complete", since="2026-13-01", page="two", per_page=0)
    assert info.value.problems == [
        "status: 'complete' is not a run status. Did you mean 'completed'?",
        "page: 'two' is not a whole number",
        "per_page: 0 is out of range (1 to 500)",
        "since: '2026-13-01' is not a date (YYYY-MM-DD) or a time (YYYY-MM-DDTHH:MM)",
    ]


# -- the reads cost what is open, not what is past ---------------------------------------------------------


@pytest.fixture(name="count_queries")
def count_queries_fixture(db_url: str) -> Iterator[Callable[[Callable[[], object]], int]]:
    engine = get_engine(db_url)
    counter = [0]

    def on_execute(*_: Any) -> None:
        counter[0] += 1

    event.listen(engine, "before_cursor_execute", on_execute)

    def count(fn: Callable[[], object]) -> int:
        counter[0] = 0
        fn()
        return counter[0]

    yield count
    event.remove(engine, "before_cursor_execute", on_execute)


@pytest.mark.slow
def test_reads_issue_the_same_queries_with_10_and_200_finished_runs(
    settings: Settings, db_url: str, make_run: MakeRun, count_queries: Callable[[Callable[[], object]], int]
) -> None:
    from flows.engine.deadlines import sweep_deadlines
    from flows.engine.escalation import escalate_overdue
    from flows.engine.outbox import sweep_outbox
    from flows.engine.subruns import resume_ready
    from flows.services.sweeps import sweep
    from flows.services.views import inbox_view

    old = utcnow() - timedelta(days=2)
    with write_session(db_url) as s:
        made = make_run(s)
        # What is open: three runs waiting on people (one overdue by its time-out), one signed.
        made.record(s, "arrival", "waiting", {"role": "cell_lab"}, at=old)
        _run_like(s, made, statuses=("scheduled", "waiting"), steps=(("arrival", "waiting"),), coi="COI-OPEN-0002")
        _run_like(
            s,
            made,
            statuses=("scheduled", "waiting"),
            steps=(
                ("arrival", "waiting"),
                ("arrival", "done"),
                ("transit_temperature", "done"),
                ("identity_verification", "waiting"),
            ),
            coi="COI-OPEN-0003",
        )
        for i in range(10):
            _run_like(s, made, steps=FINISHED_STEPS, coi=f"COI-DONE-{i:04d}", started_at=old)

    class Leases:
        def is_free(self, key: str) -> bool:
            return True

    def signed() -> object:
        with read_session(db_url) as s:
            return signed_but_suspended(s, 5.0)

    def quarantine() -> object:
        with read_session(db_url) as s:
            return quarantine_problem(s, "COI-OPEN-0002", run_id="x")

    reads: dict[str, Callable[[], object]] = {
        "inbox": lambda: inbox(settings, "ana"),
        "inbox_view": lambda: inbox_view(settings, "ana", "en"),
        "runs (open)": lambda: runs.list_runs(settings, runs.run_filter(status="open")),
        "runs (page 1)": lambda: runs.list_runs(settings),
        "escalate": lambda: escalate_overdue(settings),
        "deadlines": lambda: sweep_deadlines(settings),
        "resume_ready": lambda: resume_ready(settings, object()),
        "resume_signed": signed,
        "outbox": lambda: sweep_outbox(settings, leases=Leases()),  # type: ignore[arg-type]
        "change_control": lambda: sweep(settings),
        "quarantine": quarantine,
    }
    items = inbox(settings, "ana")
    assert sorted(i["step_id"] for i in items) == ["arrival", "arrival", "identity_verification"]
    for fn in reads.values():
        fn()  # warm: tables made sure of, SOP parsed
    # The inbox keeps what waits while the chain's head stays (flows.services.inbox): a write moves
    # the head, so the first read after one reads the board again, the second does not. Both are
    # counted, at 11 finished runs and at 200.
    with write_session(db_url) as s:
        _run_like(s, made, steps=FINISHED_STEPS, coi="COI-DONE-0010", started_at=old)
    before = {name: count_queries(fn) for name, fn in reads.items()}
    before_warm = {name: count_queries(fn) for name, fn in reads.items()}
    with write_session(db_url) as s:
        for i in range(11, 200):
            _run_like(s, made, steps=FINISHED_STEPS, coi=f"COI-DONE-{i:04d}", started_at=old)
    with read_session(db_url) as s:
        assert len(list(s.exec(select(SopRun.id)))) == 203
    after = {name: count_queries(fn) for name, fn in reads.items()}
    after_warm = {name: count_queries(fn) for name, fn in reads.items()}
    assert after == before
    assert after_warm == before_warm
    assert before_warm["inbox"] < before["inbox"]  # the kept board is used: the head read, the user's part
    assert inbox(settings, "ana") == items


@pytest.mark.slow
def test_current_state_agrees_with_the_record_through_a_real_run(engine: Settings) -> None:
    """A dose receipt run by the real executor: at each stop the current-state tables are what
    rebuilding them from the record gives (``compare`` works that out), and they say where it is."""
    from tests.fixtures_engine import ARRIVAL, sign, start_receipt, wait_for

    def agreed(run_id: str) -> tuple[str | None, dict[str, str]]:
        with read_session(engine.database_url) as s:
            assert current.compare(s, limit_problems=1000) == []
            run = s.get(CurrentRun, run_id)
            assert run is not None
            steps = {c.step_id: c.status for c in s.exec(select(CurrentStep).where(CurrentStep.run_id == run_id))}
            return run.status, steps

    run_id = start_receipt(engine, coi="COI-CURRENT-0001")
    wait_for(engine, run_id, step="arrival")
    status, steps = agreed(run_id)
    assert (status, steps.get("arrival")) == ("waiting", "waiting")
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    sign(engine, run_id, "qa_acceptance", "qa", {"decision": "approve"})
    wait_for(engine, run_id, statuses=("completed",))
    status, steps = agreed(run_id)
    assert status == "completed"
    assert {steps[k] for k in ("arrival", "identity_verification", "qa_acceptance")} == {"done"}


def test_a_web_process_compiles_its_pages_at_start_and_works_a_readers_inbox_out_at_their_sign_in(
    settings: Settings, db_url: str, make_run: MakeRun
) -> None:
    """The slow part of a first inbox page is done before it is asked for: the page templates at the
    process's start (every process compiles them once), the reader's part of what waits (their roles,
    may-they-sign) at their sign-in."""
    import re

    from fastapi.testclient import TestClient

    from flows.services import inbox as inbox_service
    from flows.web import create_app
    from tests.conftest import PASSWORD

    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        run_id = made.run.id
    app = create_app(settings)
    envs = app.state.web.envs
    assert all(len(env.cache) == 0 for env in envs.values())
    with TestClient(app, follow_redirects=False) as client:  # the lifespan: the process starts
        for env in envs.values():
            assert len(env.cache) == len(env.list_templates(extensions=["html"])) > 20
        inbox_service._boards.pop(db_url, None)  # no board kept from before the sign-in
        page = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        r = client.post("/login", data={"csrf": token.group(1), "username": "ana", "password": PASSWORD})
        assert r.status_code == 303, r.text
        board = inbox_service._boards[db_url]
        assert [w.step.id for w, cannot in board.readers["ana"]] == ["arrival"]  # before any inbox page
        assert f"/runs/{run_id}/steps/arrival" in client.get("/inbox").text
        assert inbox_service._boards[db_url] is board


def test_the_inbox_board_is_kept_across_sign_ins_and_read_again_after_an_account_change(
    settings: Settings, db_url: str, make_run: MakeRun
) -> None:
    """Every sign-in writes an ``auth.*`` event; none changes what waits or who may sign, so the
    board of what waits is kept across them. A lock is an account row and reads it again."""
    from flows.record.accounts import append_account_event, record_success
    from flows.record.tables import User
    from flows.services import inbox as inbox_service

    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        ana_id = made.users["ana"].id
    assert [i["step_id"] for i in inbox(settings, "ana")] == ["arrival"]
    board = inbox_service._boards[db_url]
    with write_session(db_url) as s:
        record_success(s, s.get_one(User, ana_id), "web")
    assert [i["step_id"] for i in inbox(settings, "ana")] == ["arrival"]
    assert inbox_service._boards[db_url] is board
    with write_session(db_url) as s:
        append_account_event(s, s.get_one(User, ana_id), "locked", actor="system", data={"failures": 5})
    inbox(settings, "ana")
    assert inbox_service._boards[db_url] is not board
