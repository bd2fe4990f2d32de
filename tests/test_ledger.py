"""The ledger: every row goes in with an audit event, the events form one hash chain from
genesis, the write lock keeps it one chain under concurrent writers, and signatures cover
exactly the data they sign. Runs on SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import col, select

from flows.errors import RecordError
from flows.record import current, ledger
from flows.record.db import read_session, write_session
from flows.record.state import next_n
from flows.record.tables import (
    AuditEvent,
    CurrentStep,
    RunEvent,
    Signature,
    User,
    utcnow,
)
from tests.conftest import MadeRun, MakeRun


def _events(url: str) -> list[AuditEvent]:
    with read_session(url) as s:
        events = list(s.exec(select(AuditEvent).order_by(col(AuditEvent.seq))))
        for ev in events:
            s.expunge(ev)
    return events


def test_ledger_chain_starts_at_genesis_and_links_each_event(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        rec = made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        rec_id, run_id = rec.id, made.run.id

    events = _events(db_url)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].prev_hash == ledger.GENESIS
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.hash
    last = events[-1]
    assert (last.object_type, last.object_id, last.action) == ("sf_step_record", rec_id, "step.waiting")
    row = json.loads(last.payload_json)["row"]
    assert row["run_id"] == run_id
    assert row["data_json"] == '{"role":"cell_lab"}'


def test_ledger_verify_chain_passes_clean_record(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting")
        made.record(s, "arrival", "signed", {"seal_intact": True, "logger_max_c": -180.5}, user="ana", sign=True)

    with read_session(db_url) as s:
        report = ledger.verify_chain(s)
    assert report.ok, report.problems
    # 2 users, 3 + 2 role grants, SOP version and its "effective" event, 2 training records, run, signature,
    # 2 step records
    assert report.rows == 15
    assert report.events == 15


def test_ledger_verify_chain_passes_empty_record(db_url: str) -> None:
    with read_session(db_url) as s:
        report = ledger.verify_chain(s)
    assert report.ok
    assert (report.events, report.rows) == (0, 0)


def test_ledger_append_refuses_naive_datetime(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        run_id = made.run.id
    naive = RunEvent(run_id=run_id, n=1, status="running", at=datetime(2026, 11, 2, 9, 30))  # noqa: DTZ001

    with pytest.raises(ValueError, match="naive datetime") as info, write_session(db_url) as s:
        ledger.append(s, naive, actor="system")

    assert "sf_run_event.at" in str(info.value)
    with read_session(db_url) as s:
        assert s.exec(select(RunEvent)).first() is None  # the transaction was rolled back


def test_ledger_append_refuses_a_table_outside_the_record(db_url: str) -> None:
    event = AuditEvent(
        seq=1,
        at=utcnow(),
        actor="x",
        action="x",
        object_type="x",
        object_id="x",
        payload_json="{}",
        prev_hash="a",
        hash="b",
    )

    with pytest.raises(TypeError, match="not a record table") as info, write_session(db_url) as s:
        ledger.append(s, event, actor="system")

    assert "AuditEvent" in str(info.value)


def test_ledger_append_stores_non_utc_aware_time_as_the_same_instant(db_url: str, make_run: MakeRun) -> None:
    shanghai = datetime(2026, 11, 2, 9, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        ev = RunEvent(run_id=made.run.id, n=1, status="running", at=shanghai)
        ledger.append(s, ev, actor="system")
        ev_id = ev.id

    with read_session(db_url) as s:
        stored = s.get(RunEvent, ev_id)
        assert stored is not None
        at = stored.at if stored.at.tzinfo else stored.at.replace(tzinfo=UTC)
        report = ledger.verify_chain(s)
    assert at == shanghai  # the same instant (01:30 UTC), whatever the database does with zones
    assert report.ok, report.problems


def test_ledger_write_session_rolls_back_on_error(db_url: str, make_run: MakeRun) -> None:
    def write_then_fail() -> None:
        with write_session(db_url) as s:
            make_run(s, users=("ana",))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()

    with read_session(db_url) as s:
        assert s.exec(select(User)).first() is None
        assert s.exec(select(AuditEvent)).first() is None


def test_ledger_write_session_turns_database_refusal_into_record_error(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        run_id = made.run.id
    bad = RunEvent(run_id="no-such-run", n=1, status="running", at=utcnow())  # foreign key fails

    with pytest.raises(RecordError, match="the sopflow database refused the write") as info, write_session(db_url) as s:
        ledger.append(s, bad, actor="system")

    assert "foreign key" in str(info.value).lower()
    with read_session(db_url) as s:
        assert s.exec(select(RunEvent)).first() is None
        assert s.get(type(made.run), run_id) is not None  # earlier writes stay


@pytest.mark.slow
def test_ledger_concurrent_appends_form_one_unbroken_chain(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        run_id = made.run.id
    threads_n, appends_n = 4, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def writer(k: int) -> None:
        try:
            start.wait()
            for i in range(appends_n):
                with write_session(db_url) as s:
                    ev = RunEvent(
                        run_id=run_id,
                        n=next_n(s, RunEvent, run_id),
                        status="running",
                        detail=f"thread {k} append {i}",
                        at=utcnow(),
                    )
                    ledger.append(s, ev, actor="system")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors, errors
    events = _events(db_url)
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1))  # no gap, no duplicate
    assert len({e.prev_hash for e in events}) == len(events)
    with read_session(db_url) as s:
        ns = sorted(e.n for e in s.exec(select(RunEvent).where(RunEvent.run_id == run_id)))
        report = ledger.verify_chain(s)
    assert ns == list(range(1, threads_n * appends_n + 1))
    assert report.ok, report.problems


# --------------------------------------------------------------------------- signatures


def _signed_arrival(db_url: str, make_run: MakeRun) -> tuple[MadeRun, str, str]:
    """A run whose arrival step carries ana's signature; returns (made, signature id, record id)."""
    with write_session(db_url) as s:
        made = make_run(s)
        made.record(s, "arrival", "waiting")
        rec = made.record(s, "arrival", "signed", {"seal_intact": True, "logger_max_c": -180}, user="ana", sign=True)
        sig_id, rec_id = rec.signature_id, rec.id
        s.expunge_all()
    assert sig_id is not None
    return made, sig_id, rec_id


def test_ledger_verify_signature_accepts_a_correct_signature(db_url: str, make_run: MakeRun) -> None:
    _, sig_id, _ = _signed_arrival(db_url, make_run)

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem is None


def test_ledger_verify_signature_reports_changed_step_data(db_url: str, make_run: MakeRun, sql) -> None:
    _, sig_id, rec_id = _signed_arrival(db_url, make_run)
    sql(
        "UPDATE sf_step_record SET data_json = :d WHERE id = :id",
        d='{"logger_max_c":-20,"seal_intact":true}',
        id=rec_id,
    )

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem == f"signature {sig_id}: the signed data no longer matches its hash"


def test_ledger_verify_signature_reports_changed_signer(db_url: str, make_run: MakeRun, sql) -> None:
    made, sig_id, _ = _signed_arrival(db_url, make_run)
    sql(
        "UPDATE sf_signature SET user_id = :u, printed_name = :p WHERE id = :id",
        u=made.users["bo"].id,
        p="Bo Wang",
        id=sig_id,
    )

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem is not None
    assert "no longer matches" in problem


def test_ledger_verify_signature_reports_signature_attached_to_another_step(db_url: str, make_run: MakeRun) -> None:
    made, sig_id, _ = _signed_arrival(db_url, make_run)
    with write_session(db_url) as s:  # accepted as usual, then a record of another step reuses the signature
        made.record(s, "arrival", "done", {"seal_intact": True, "logger_max_c": -180}, user="ana", signature_id=sig_id)
        made.record(s, "identity_verification", "signed", {"coi_matches": True}, user="ana", signature_id=sig_id)

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem is not None
    assert problem.startswith(f"signature {sig_id} is for ")
    assert problem.endswith("/identity_verification")


def test_ledger_verify_signature_reports_changed_data_of_the_accepted_record(
    db_url: str, make_run: MakeRun, sql
) -> None:
    made, sig_id, _ = _signed_arrival(db_url, make_run)
    with write_session(db_url) as s:  # the flow accepts: a "done" record carrying the same signature
        done = made.record(
            s, "arrival", "done", {"seal_intact": True, "logger_max_c": -180}, user="ana", signature_id=sig_id
        )
        done_id = done.id
    sql(
        "UPDATE sf_step_record SET data_json = :d WHERE id = :id",
        d='{"logger_max_c":-20,"seal_intact":true}',
        id=done_id,
    )

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem == f"signature {sig_id}: the signed data no longer matches its hash"


def test_ledger_verify_signature_reports_signature_moved_to_another_step(db_url: str, make_run: MakeRun, sql) -> None:
    _, sig_id, rec_id = _signed_arrival(db_url, make_run)
    sql("UPDATE sf_step_record SET step_id = 'identity_verification' WHERE id = :id", id=rec_id)

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem is not None
    assert f"signature {sig_id} is for" in problem
    assert "/arrival, attached to" in problem
    assert problem.endswith("/identity_verification")


def test_ledger_verify_signature_reports_signature_without_record(db_url: str, make_run: MakeRun, sql) -> None:
    _, sig_id, rec_id = _signed_arrival(db_url, make_run)
    sql("UPDATE sf_step_record SET signature_id = NULL WHERE id = :id", id=rec_id)

    with read_session(db_url) as s:
        sig = s.get(Signature, sig_id)
        assert sig is not None
        problem = ledger.verify_signature(s, sig)
    assert problem == f"signature {sig_id} is attached to no step record"


def test_ledger_signed_content_covers_time_as_utc_instant() -> None:
    from flows.record.tables import SopRun

    run = SopRun(
        id="r1",
        institution="i",
        sop_version_id="v",
        sop_id="s",
        sop_version=1,
        sop_sha256="abc",
        schema_version=1,
        params_json="{}",
        flow_run_id="f",
        started_by="u",
        started_at=utcnow(),
    )
    at = datetime(2026, 11, 2, 9, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
    sig_local = Signature(
        run_id="r1", step_id="a", user_id="u", printed_name="U", meaning="performed", signed_at=at, signed_sha256=""
    )
    sig_utc = Signature(
        run_id="r1",
        step_id="a",
        user_id="u",
        printed_name="U",
        meaning="performed",
        signed_at=at.astimezone(UTC),
        signed_sha256="",
    )
    sig_naive_utc = Signature(
        run_id="r1",
        step_id="a",
        user_id="u",
        printed_name="U",
        meaning="performed",
        signed_at=at.astimezone(UTC).replace(tzinfo=None),
        signed_sha256="",
    )
    digests = {
        ledger.sha256_hex(ledger.canonical(ledger.signed_content(run, "a", {}, sig)))
        for sig in (sig_local, sig_utc, sig_naive_utc)
    }
    assert len(digests) == 1
    later = Signature(
        run_id="r1",
        step_id="a",
        user_id="u",
        printed_name="U",
        meaning="performed",
        signed_at=at + timedelta(seconds=1),
        signed_sha256="",
    )
    assert ledger.sha256_hex(ledger.canonical(ledger.signed_content(run, "a", {}, later))) not in digests


def test_ledger_canonical_refuses_values_outside_json() -> None:
    with pytest.raises(TypeError, match="cannot put") as info:
        ledger.canonical({"x": {1, 2}})

    assert "set" in str(info.value)


def test_ledger_append_many_writes_the_rows_and_chain_append_would(db_url: str, make_run: MakeRun) -> None:
    """``append_many`` (bulk writes: bench/history.py builds its histories with it) continues the chain
    from its head, in the entries' order, rows and row-less events alike, and a new run's rows may
    follow it in the same call (referenced tables are inserted first)."""
    from flows.record.tables import SopRun, StepRecord, new_id

    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        run = SopRun(**{k: getattr(made.run, k) for k in SopRun.model_fields if k != "id"}, id=new_id())
        head_seq = s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).one().seq
    rec = StepRecord(
        run_id=run.id, n=1, step_id="arrival", kind="record", status="waiting", data_json="{}", at=utcnow()
    )
    ev = RunEvent(
        run_id=run.id, n=1, status="waiting", at=datetime(2026, 11, 2, 9, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
    )
    entries = [
        ledger.Entry("someone", "run.start", run),
        ledger.Entry("system", "run.waiting", ev),
        ledger.Entry("someone", None, None, "a reason", "sf_user", "ana", {"purpose": "sign"}),
        ledger.Entry("system", "step.waiting", rec),
    ]
    with write_session(db_url) as s:
        assert ledger.append_many(s, entries) == 4

    events = _events(db_url)[head_seq:]
    assert [e.seq for e in events] == [head_seq + 1, head_seq + 2, head_seq + 3, head_seq + 4]
    assert [(e.actor, e.action, e.object_type, e.object_id, e.reason) for e in events] == [
        ("someone", "run.start", "sf_run", run.id, None),
        ("system", "run.waiting", "sf_run_event", ev.id, None),
        ("someone", "", "sf_user", "ana", "a reason"),
        ("system", "step.waiting", "sf_step_record", rec.id, None),
    ]
    assert json.loads(events[2].payload_json) == {"purpose": "sign"}
    # The aware non-UTC time went in as the same instant in UTC, as append stores it.
    assert json.loads(events[1].payload_json)["row"]["at"] == "2026-11-02T01:30:00+00:00"
    with read_session(db_url) as s:
        report = ledger.verify_chain(s)
        # The current-state tables moved with the bulk write as append moves them.
        assert current.compare(s) == []
        assert s.get(CurrentStep, {"run_id": run.id, "step_id": rec.step_id}) is not None
    assert report.ok, report.problems


def test_ledger_append_many_refuses_a_naive_datetime_and_writes_nothing(db_url: str, make_run: MakeRun) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        run_id = made.run.id
    before = len(_events(db_url))
    good = RunEvent(run_id=run_id, n=1, status="running", at=utcnow())
    naive = RunEvent(run_id=run_id, n=2, status="waiting", at=datetime(2026, 11, 2, 9, 30))  # noqa: DTZ001
    with pytest.raises(ValueError, match="naive datetime"), write_session(db_url) as s:
        ledger.append_many(s, [ledger.Entry("system", "run.running", good), ledger.Entry("system", None, naive)])
    assert len(_events(db_url)) == before
