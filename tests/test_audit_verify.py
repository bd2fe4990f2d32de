"""``verify_chain`` (``sopflow audit verify``) against a record changed behind sopflow's back:
each test edits, deletes, inserts or reorders with raw SQL and asserts the report names the
table and id (or the audit event) that was touched. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import select

from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.tables import AuditEvent, new_id
from tests.conftest import MakeRun


@dataclass
class Clean:
    run_id: str
    waiting_id: str
    signed_id: str
    done_id: str
    signature_id: str
    seq: dict[str, int]
    """The audit event's seq of each row, by row id."""


def _clean_record(db_url: str, make_run: MakeRun) -> Clean:
    with write_session(db_url) as s:
        made = make_run(s)
        waiting = made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        signed = made.record(s, "arrival", "signed", {"seal_intact": True, "logger_max_c": -180}, user="ana", sign=True)
        done = made.record(
            s,
            "arrival",
            "done",
            {"seal_intact": True, "logger_max_c": -180},
            user="ana",
            signature_id=signed.signature_id,
        )
        made.record(s, "transit_temperature", "done", {"passed": True})
        clean = Clean(made.run.id, waiting.id, signed.id, done.id, str(signed.signature_id), {})
        for ev in s.exec(select(AuditEvent)):
            clean.seq[ev.object_id] = ev.seq
    with read_session(db_url) as s:
        report = ledger.verify_chain(s)
    assert report.ok, report.problems
    return clean


def _verify(db_url: str) -> list[str]:
    with read_session(db_url) as s:
        return ledger.verify_chain(s).problems


def test_audit_verify_reports_edited_record_row(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    sql(
        "UPDATE sf_step_record SET data_json = :d WHERE id = :id",
        d='{"logger_max_c":-20,"seal_intact":true}',
        id=clean.done_id,
    )

    problems = _verify(db_url)

    assert problems[0] == f"sf_step_record row {clean.done_id}: changed since it was recorded (data_json)"
    # the signature no longer covers the edited data either (issue 11: verify checks Signature hashes)
    assert problems[1:] == [
        f"signature {clean.signature_id}: the signed data no longer matches its hash "
        f"(step record {clean.done_id}, {clean.run_id}/arrival)"
    ]


def test_audit_verify_reports_rows_reordered_by_their_position(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    sql("UPDATE sf_step_record SET n = -1 WHERE id = :id", id=clean.waiting_id)
    sql("UPDATE sf_step_record SET n = 1 WHERE id = :id", id=clean.signed_id)
    sql("UPDATE sf_step_record SET n = 2 WHERE id = :id", id=clean.waiting_id)

    problems = _verify(db_url)

    assert sorted(problems) == sorted(
        [
            f"sf_step_record row {clean.waiting_id}: changed since it was recorded (n)",
            f"sf_step_record row {clean.signed_id}: changed since it was recorded (n)",
        ]
    )


def test_audit_verify_reports_edited_time_of_a_row(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    sql("UPDATE sf_run SET started_at = :t WHERE id = :id", t="2026-11-01 00:00:00", id=clean.run_id)

    problems = _verify(db_url)

    assert problems == [f"sf_run row {clean.run_id}: changed since it was recorded (started_at)"]


def test_audit_verify_reports_deleted_record_row(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    assert sql("DELETE FROM sf_step_record WHERE id = :id", id=clean.waiting_id) == 1

    problems = _verify(db_url)

    assert problems == [f"sf_step_record row {clean.waiting_id}: recorded in the audit chain but missing: deleted"]


def test_audit_verify_reports_row_inserted_with_raw_sql(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    rogue = new_id()
    sql(
        "INSERT INTO sf_step_record (id, run_id, n, step_id, kind, status, data_json, at) "
        "VALUES (:id, :run, 99, 'qa_acceptance', 'approve', 'done', '{\"decision\":\"accept\"}', '2026-11-02 01:30:00')",
        id=rogue,
        run=clean.run_id,
    )

    problems = _verify(db_url)

    assert problems == [f"sf_step_record row {rogue}: not in the audit chain: inserted outside sopflow"]


def test_audit_verify_reports_edited_audit_event(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    seq = clean.seq[clean.signed_id]
    sql("UPDATE sf_audit SET actor = 'someone-else' WHERE seq = :seq", seq=seq)

    problems = _verify(db_url)

    assert problems == [f"audit event {seq}: its content does not match its hash: the event was edited"]


def test_audit_verify_reports_edited_audit_event_payload_with_its_row(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    seq = clean.seq[clean.done_id]
    with read_session(db_url) as s:
        ev = s.get(AuditEvent, seq)
        assert ev is not None
        forged = ev.payload_json.replace('\\"logger_max_c\\":-180', '\\"logger_max_c\\":-20')
    assert forged != ev.payload_json
    sql("UPDATE sf_audit SET payload_json = :p WHERE seq = :seq", p=forged, seq=seq)
    sql(
        "UPDATE sf_step_record SET data_json = :d WHERE id = :id",
        d='{"logger_max_c":-20,"seal_intact":true}',
        id=clean.done_id,
    )

    problems = _verify(db_url)

    assert problems == [
        f"audit event {seq}: its content does not match its hash: the event was edited",
        f"signature {clean.signature_id}: the signed data no longer matches its hash "
        f"(step record {clean.done_id}, {clean.run_id}/arrival)",
    ]


def test_audit_verify_reports_rehashed_audit_event_at_the_next_link(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    seq = clean.seq[clean.signed_id]
    with read_session(db_url) as s:  # an editor who also recomputes the event's own hash
        ev = s.get(AuditEvent, seq)
        assert ev is not None
        ev.actor = "someone-else"
        rehashed = ledger._event_hash(ev)
        s.rollback()
    sql("UPDATE sf_audit SET actor = 'someone-else', hash = :h WHERE seq = :seq", h=rehashed, seq=seq)

    problems = _verify(db_url)

    assert problems == [
        f"audit event {seq + 1}: does not follow event {seq} (prev_hash differs): "
        "the chain was edited or reordered here"
    ]


def test_audit_verify_reports_deleted_audit_event(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    seq = clean.seq[clean.signed_id]
    assert sql("DELETE FROM sf_audit WHERE seq = :seq", seq=seq) == 1

    problems = _verify(db_url)

    assert problems[0] == f"audit event {seq} is missing (next is {seq + 1}): an event was deleted"
    assert (
        f"audit event {seq + 1}: does not follow event {seq} (prev_hash differs): the chain was edited or reordered here"
        in problems
    )
    assert f"sf_step_record row {clean.signed_id}: not in the audit chain: inserted outside sopflow" in problems
    assert len(problems) == 3


def test_audit_verify_reports_deleted_head_event_by_its_row(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    head = max(clean.seq.values())
    row_id = next(k for k, v in clean.seq.items() if v == head)
    assert sql("DELETE FROM sf_audit WHERE seq = :seq", seq=head) == 1

    problems = _verify(db_url)

    assert problems == [f"sf_step_record row {row_id}: not in the audit chain: inserted outside sopflow"]


def test_audit_verify_reports_swapped_audit_events(db_url: str, make_run: MakeRun, sql) -> None:
    clean = _clean_record(db_url, make_run)
    a = clean.seq[clean.signed_id]
    b = a + 1
    sql("UPDATE sf_audit SET seq = -1 WHERE seq = :a", a=a)
    sql("UPDATE sf_audit SET seq = :a WHERE seq = :b", a=a, b=b)
    sql("UPDATE sf_audit SET seq = :b WHERE seq = -1", b=b)

    problems = _verify(db_url)

    assert (
        problems[0]
        == f"audit event {a}: does not follow event {a - 1} (prev_hash differs): the chain was edited or reordered here"
    )
    assert f"audit event {a}: its content does not match its hash: the event was edited" in problems
    assert (
        f"audit event {b}: does not follow event {a} (prev_hash differs): the chain was edited or reordered here"
        in problems
    )
    assert all("row" not in p for p in problems)  # the rows themselves are intact


def test_audit_verify_stops_at_the_problem_limit(db_url: str, make_run: MakeRun, sql) -> None:
    _clean_record(db_url, make_run)
    sql("UPDATE sf_audit SET reason = 'rewritten'")

    with read_session(db_url) as s:
        report = ledger.verify_chain(s, limit_problems=3)

    assert len(report.problems) == 3
    assert report.problems[0] == "audit event 1: its content does not match its hash: the event was edited"
    assert not report.ok
