"""Tamper evidence against whoever holds the database (issue 11, part 4): signed checkpoints of the
audit chain's head, and ``audit verify`` naming tail truncation, a signed value edited with the
event hashes recomputed, a full recompute without the key, ``--against`` a document, and
``verify-export`` of a tampered checkpoint offline. On SQLite and PostgreSQL: every attack is raw
SQL behind sopflow's back, as someone holding the database would do it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy import select as sa_select
from sqlmodel import col, select
from typer.testing import CliRunner

from flows.cli import app
from flows.config import Settings, get_settings
from flows.errors import ConfigError
from flows.record import ledger
from flows.record.checkpoints import ensure_checkpoint, load_signing_key
from flows.record.db import get_engine, read_session, write_session
from flows.record.tables import (
    RECORD_TABLES,
    AuditCheckpoint,
    AuditEvent,
    Signature,
    SopRun,
    StepRecord,
    User,
    UTCDateTime,
    utcnow,
)
from flows.services import audit as audit_service
from flows.services import runs as runs_service
from tests.conftest import MakeRun

REPO = Path(__file__).resolve().parent.parent
ARRIVAL = {"seal_intact": True, "logger_max_c": -180}


@pytest.fixture(name="settings")
def settings_fixture(db_url: str, tmp_path: Path) -> Settings:
    """This test's own home: its own checkpoint key and its own record of the last verified checkpoint."""
    home = tmp_path / "home"
    home.mkdir()
    return dataclasses.replace(get_settings(), home=home, database_url=db_url, notify_config=tmp_path / "none.yaml")


def _history(settings: Settings, make_run: MakeRun, steps: int = 25) -> str:
    """A run with a signed arrival and ``steps`` more step records (well over 40 events); returns its id."""
    with write_session(settings.database_url) as s:
        made = make_run(s, product=None)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        signed = made.record(s, "arrival", "signed", ARRIVAL, user="ana", sign=True)
        made.record(s, "arrival", "done", ARRIVAL, user="ana", signature_id=signed.signature_id)
        for i in range(steps):
            made.record(
                s, "transit_temperature", "done", {"expect": "logger_max_c <= -150", "passed": True, "detail": f"#{i}"}
            )
        return made.run.id


def _checkpoint(settings: Settings) -> AuditCheckpoint:
    key = load_signing_key(settings)
    with write_session(settings.database_url) as s:
        cp = ensure_checkpoint(s, key)
        assert cp is not None
        s.expunge(cp)
    return cp


def _verify(settings: Settings, **kw: Any) -> ledger.ChainReport:
    return audit_service.verify_audit(settings, **kw)


_CURRENT_REFS = {
    "sf_run": (("sf_current_step", "run_id"), ("sf_current_run", "run_id")),
    "sf_deviation": (("sf_current_quarantine", "deviation_id"),),
}


def _truncate(sql: Any, settings: Settings, k: int) -> int:
    """Delete the newest ``k`` audit events and the rows they recorded; returns the new head's seq."""
    with read_session(settings.database_url) as s:
        events = list(s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(k)))
    for ev in events:  # newest first: a row is deleted before the rows it points at
        if ev.object_type in RECORD_TABLES:
            # The current-state rows that point at the row go first (foreign keys), as whoever holds the
            # database would delete them: they are not records, so no hash covers them.
            for table, column in _CURRENT_REFS.get(ev.object_type, ()):
                sql(f"DELETE FROM {table} WHERE {column} = :id", id=ev.object_id)  # noqa: S608  (names of ours)
            sql(f"DELETE FROM {ev.object_type} WHERE id = :id", id=ev.object_id)  # noqa: S608  (a table name of ours)
        sql("DELETE FROM sf_audit WHERE seq = :seq", seq=ev.seq)
    return events[-1].seq - 1


def _rechain(sql: Any, settings: Settings, rows: dict[str, dict[str, Any]]) -> None:
    """What a database holder without the key can do: give the events recording ``rows`` (by row id)
    the rows' new content, then recompute every event hash from the first changed one on."""
    with read_session(settings.database_url) as s:
        events = list(s.exec(select(AuditEvent).order_by(col(AuditEvent.seq))))
        for ev in events:
            s.expunge(ev)
    prev, changing = ledger.GENESIS, False
    for ev in events:
        if ev.object_id in rows:
            payload = json.loads(ev.payload_json)
            payload["row"] = rows[ev.object_id]
            ev.payload_json = ledger.canonical(payload).decode()
            changing = True
        if changing:
            ev.prev_hash = prev
            ev.hash = ledger._event_hash(ev)
            sql(
                "UPDATE sf_audit SET payload_json = :p, prev_hash = :ph, hash = :h WHERE seq = :seq",
                p=ev.payload_json,
                ph=ev.prev_hash,
                h=ev.hash,
                seq=ev.seq,
            )
        prev = ev.hash


def _edit_arrival(sql: Any, settings: Settings, run_id: str, *, resign: bool) -> tuple[StepRecord, Signature]:
    """Change the signed arrival's temperature in both of its step records (and, with ``resign``,
    recompute the signature's hash over the new data), then recompute the chain over the new rows."""
    forged = {**ARRIVAL, "logger_max_c": -20}
    updates: list[tuple[str, dict[str, Any]]] = []
    with read_session(settings.database_url) as s:
        recs = list(
            s.exec(
                select(StepRecord)
                .where(StepRecord.run_id == run_id, col(StepRecord.signature_id).is_not(None))
                .order_by(col(StepRecord.n))  # the first is the one verify names: it reads them in this order
            )
        )
        sig = s.get(Signature, recs[0].signature_id)
        run = s.get(SopRun, run_id)
        assert sig is not None
        assert run is not None
        new_rows: dict[str, dict[str, Any]] = {}
        for rec in recs:
            rec.data_json = ledger.canonical(forged).decode()
            new_rows[rec.id] = json.loads(ledger.canonical(ledger.row_payload(rec)))
            updates.append(
                ("UPDATE sf_step_record SET data_json = :d WHERE id = :id", {"d": rec.data_json, "id": rec.id})
            )
        if resign:
            sig.signed_sha256 = ledger.sha256_hex(
                ledger.canonical(ledger.signed_content(run, sig.step_id, forged, sig))
            )
            new_rows[sig.id] = json.loads(ledger.canonical(ledger.row_payload(sig)))
            updates.append(
                ("UPDATE sf_signature SET signed_sha256 = :h WHERE id = :id", {"h": sig.signed_sha256, "id": sig.id})
            )
        s.expunge_all()
    for statement, params in updates:
        sql(statement, **params)
    _rechain(sql, settings, new_rows)
    return recs[0], sig


# --------------------------------------------------------------------------- a clean record


def test_tamper_clean_record_with_checkpoints_verifies_full_and_incremental(
    settings: Settings, make_run: MakeRun
) -> None:
    _history(settings, make_run)
    cp = _checkpoint(settings)

    full = _verify(settings)

    assert full.ok, full.problems
    assert (full.checkpoints, full.head) == (1, (cp.seq, cp.head_hash))
    assert full.signatures == 1
    assert _checkpoint(settings).n == 1  # nothing new: the same checkpoint

    again = _verify(settings, incremental=True)

    assert again.ok, again.problems
    assert again.start == cp.seq
    assert again.events == 0


def _more_checks(settings: Settings, run_id: str, first_n: int, count: int) -> list[str]:
    """``count`` passed checks appended to run ``run_id`` through the ledger (step record n from
    ``first_n``): what an incremental walk finds after a checkpoint. Their ids, in order."""
    ids = []
    with write_session(settings.database_url) as s:
        for n in range(first_n, first_n + count):
            more = StepRecord(
                run_id=run_id,
                n=n,
                step_id="transit_temperature",
                kind="check",
                status="done",
                data_json='{"passed":true}',
                at=utcnow(),
            )
            ledger.append(s, more, actor="system")
            ids.append(more.id)
    return ids


def _incremental_selects(settings: Settings) -> tuple[Any, list[tuple[str, Any]]]:
    """An incremental ``audit verify``'s report, with every SELECT it sent (statement, parameters)."""
    asked: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            asked.append((statement, params))

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        report = _verify(settings, incremental=True)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return report, asked


def test_tamper_incremental_verify_checks_what_follows_the_verified_checkpoint(
    settings: Settings, make_run: MakeRun, sql: Any
) -> None:
    run_id = _history(settings, make_run)
    _checkpoint(settings)
    assert _verify(settings).ok
    (more_id,) = _more_checks(settings, run_id, 99, 1)
    second = _checkpoint(settings)
    sql("UPDATE sf_step_record SET status = 'failed' WHERE id = :id", id=more_id)

    report = _verify(settings, incremental=True)

    assert report.start == second.seq - 1
    assert report.events == 1
    assert report.problems == [f"sf_step_record row {more_id}: changed since it was recorded (status)"]


def test_tamper_incremental_verify_reads_the_rows_since_the_checkpoint_by_table_not_one_by_one(
    settings: Settings, make_run: MakeRun, sql: Any
) -> None:
    """The rows the events after a verified checkpoint recorded are read a batch of ids a statement
    (one statement a row made an incremental walk cost ~0.5 ms a row on PostgreSQL), and each is
    still judged against its own event: a deleted one and an edited one are both named, in the
    chain's order."""
    run_id = _history(settings, make_run)
    _checkpoint(settings)
    assert _verify(settings).ok
    ids = _more_checks(settings, run_id, 100, 12)
    _checkpoint(settings)
    sql("DELETE FROM sf_step_record WHERE id = :id", id=ids[3])
    sql("UPDATE sf_step_record SET status = 'failed' WHERE id = :id", id=ids[8])
    report, selects = _incremental_selects(settings)
    asked = [statement for statement, _ in selects if "FROM sf_step_record" in statement]

    assert report.problems == [
        f"sf_step_record row {ids[3]}: recorded in the audit chain but missing: deleted",
        f"sf_step_record row {ids[8]}: changed since it was recorded (status)",
    ]
    assert report.rows == 12
    # the rows in one statement, the signatures they might carry in another: not one per row
    assert len(asked) <= 3, asked


# --------------------------------------------------------------------------- tail truncation


@pytest.mark.parametrize("k", [1, 5, 40])
def test_tamper_tail_truncation_is_caught_and_named(settings: Settings, make_run: MakeRun, sql: Any, k: int) -> None:
    _history(settings, make_run)
    cp = _checkpoint(settings)
    assert cp.seq > 40

    left = _truncate(sql, settings, k)
    with read_session(settings.database_url) as s:  # what the old verify saw: a consistent chain
        assert ledger.verify_chain(s).ok
    report = _verify(settings)

    assert not report.ok
    assert report.problems[0] == (
        f"the chain ends at event {left} but checkpoint 1 (made {cp.created_at:%Y-%m-%d %H:%M} UTC) "
        f"covers event {cp.seq}: events were removed"
    )


def test_tamper_truncation_with_its_checkpoints_removed_is_caught_by_the_kept_one(
    settings: Settings, make_run: MakeRun, sql: Any
) -> None:
    _history(settings, make_run)
    cp = _checkpoint(settings)
    assert _verify(settings).ok  # keeps checkpoint 1 outside the database

    left = _truncate(sql, settings, 5)
    sql("DELETE FROM sf_audit_checkpoint")
    report = _verify(settings)

    assert any(
        p.startswith(f"checkpoint 1 (made {cp.created_at:%Y-%m-%d %H:%M} UTC), which audit verify found good here")
        and f"covering event {cp.seq}, is gone from the database" in p
        for p in report.problems
    ), report.problems
    assert (
        f"the chain ends at event {left} but the verified checkpoint 1 (made {cp.created_at:%Y-%m-%d %H:%M} UTC) "
        f"covers event {cp.seq}: events were removed"
    ) in report.problems


# --------------------------------------------------------------------------- rewriting


def test_tamper_signed_value_edited_with_event_hashes_recomputed_is_caught(
    settings: Settings, make_run: MakeRun, sql: Any
) -> None:
    run_id = _history(settings, make_run)
    _checkpoint(settings)

    rec, sig = _edit_arrival(sql, settings, run_id, resign=False)
    with read_session(settings.database_url) as s:  # rows and events agree again
        chain = ledger.verify_chain(s)
    report = _verify(settings)

    assert chain.problems == [
        f"signature {sig.id}: the signed data no longer matches its hash (step record {rec.id}, {run_id}/arrival)"
    ]
    assert report.problems[0] == chain.problems[0]


def _signed_after_a_verified_checkpoint(settings: Settings, make_run: MakeRun) -> str:
    """A run waiting at its arrival, checkpointed and verified; then the arrival signed (the
    signature and its two step records after the verified checkpoint). Returns the run's id."""
    with write_session(settings.database_url) as s:
        made = make_run(s, product=None)
        made.record(s, "arrival", "waiting", {"role": "cell_lab"})
        run_id, user_ids = made.run.id, {name: u.id for name, u in made.users.items()}
    _checkpoint(settings)
    assert _verify(settings).ok
    with write_session(settings.database_url) as s:  # after the verified checkpoint
        run, users = s.get_one(SopRun, run_id), {name: s.get_one(User, i) for name, i in user_ids.items()}
        later = dataclasses.replace(made, run=run, users=users)
        signed = later.record(s, "arrival", "signed", ARRIVAL, user="ana", sign=True)
        later.record(s, "arrival", "done", ARRIVAL, user="ana", signature_id=signed.signature_id)
    return run_id


def test_tamper_incremental_verify_checks_the_signatures_made_since_the_verified_checkpoint(
    settings: Settings, make_run: MakeRun, sql: Any
) -> None:
    run_id = _signed_after_a_verified_checkpoint(settings, make_run)

    rec, sig = _edit_arrival(sql, settings, run_id, resign=False)
    report = _verify(settings, incremental=True)

    assert report.start > 0
    assert report.signatures == 1
    assert report.problems == [
        f"signature {sig.id}: the signed data no longer matches its hash (step record {rec.id}, {run_id}/arrival)"
    ]


def test_tamper_incremental_verify_reads_the_chain_by_its_primary_key_alone(
    settings: Settings, make_run: MakeRun
) -> None:
    """What an incremental walk asks of the record reaches the events after the checkpoint through
    the primary key, and the signatures and step records they name through their keys: never an
    index over every event of a kind, nor a scan of a table (its cost would grow with history)."""
    _signed_after_a_verified_checkpoint(settings, make_run)
    report, asked = _incremental_selects(settings)
    engine = get_engine(settings.database_url)
    assert report.ok, report.problems
    assert (report.signatures, report.rows) == (1, 3)  # the signature, its two step records and itself
    assert any("sf_signature" in statement for statement, _ in asked)
    dialect = engine.dialect.name
    with engine.connect() as conn:
        for statement, params in asked:
            if dialect == "sqlite":
                plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params))
            else:
                plan = " ".join(str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN {statement}", params))
            assert "ix_sf_audit_object" not in plan, (statement, plan)
            # PostgreSQL's planner rightly scans tables this small; a read of the newest row (LIMIT) walks one.
            if dialect == "sqlite" and "LIMIT" not in statement:
                for table in ("sf_audit", "sf_step_record", "sf_signature", "sf_run "):
                    assert f"SCAN {table}" not in plan + " ", (statement, plan)


def test_tamper_full_recompute_without_the_key_is_caught_by_the_checkpoint(
    settings: Settings, make_run: MakeRun, sql: Any
) -> None:
    run_id = _history(settings, make_run)
    cp = _checkpoint(settings)

    _edit_arrival(sql, settings, run_id, resign=True)
    with read_session(settings.database_url) as s:  # rows, signatures and events all agree again
        assert ledger.verify_chain(s).ok
        live = s.get(AuditEvent, cp.seq)
        assert live is not None
    report = _verify(settings)

    assert report.problems == [
        f"audit event {cp.seq} has hash {live.hash[:12]}…, but checkpoint 1 (made {cp.created_at:%Y-%m-%d %H:%M} UTC) "
        f"signed {cp.head_hash[:12]}…: the chain was rewritten at or before that event (its hashes recomputed without "
        "the key)"
    ]


def test_tamper_checkpoint_forged_with_another_key_is_named(
    settings: Settings, make_run: MakeRun, sql: Any, tmp_path: Path
) -> None:
    _history(settings, make_run)
    _checkpoint(settings)
    other = dataclasses.replace(settings, home=tmp_path / "intruder")
    (tmp_path / "intruder").mkdir()
    forged_key = load_signing_key(other)
    sql("DELETE FROM sf_audit_checkpoint")
    with write_session(settings.database_url) as s:
        ensure_checkpoint(s, forged_key)

    report = _verify(settings)

    assert report.problems[0].startswith(f"checkpoint 1 (event {_head(settings)}): signed by key {forged_key.key_id}")


def _head(settings: Settings) -> int:
    with read_session(settings.database_url) as s:
        ev = s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc())).first()
        assert ev is not None
        return ev.seq


# --------------------------------------------------------------------------- --against a document


def test_tamper_against_a_document_after_truncation_fails(
    settings: Settings, make_run: MakeRun, sql: Any, tmp_path: Path
) -> None:
    from flows.engine.steps import document_now, load_context
    from flows.outputs.documents import render_document

    run_id = _history(settings, make_run)
    ctx = load_context(settings, run_id)
    step = ctx.sop.step("receipt_record")
    context = document_now(ctx, step)  # type: ignore[arg-type]
    text, _ = render_document(settings.templates_dir, ctx.run.institution, ctx.timezone, "record.en.html.j2", context)
    html = tmp_path / "receipt.html"
    html.write_text(text, encoding="utf-8")
    with read_session(settings.database_url) as s:
        cp = s.exec(select(AuditCheckpoint)).one()
    assert f"<code>{cp.head_hash}</code>" in html.read_text(encoding="utf-8")
    runner = CliRunner()
    env = {"SOPFLOW_HOME": str(settings.home), "SOPFLOW_DATABASE_URL": settings.database_url}
    assert runner.invoke(app, ["audit", "verify", "--against", str(html)], env=env).exit_code == 0

    sql("DELETE FROM sf_audit_checkpoint")  # the holder removes the database's own evidence too
    left = _truncate(sql, settings, 3)
    done = runner.invoke(app, ["audit", "verify", "--against", str(html)], env=env)

    assert done.exit_code == 1
    assert (
        f"audit verify: the chain ends at event {left} but receipt.html's checkpoint 1 (made "
        f"{cp.created_at:%Y-%m-%d %H:%M} UTC) covers event {cp.seq}: events were removed"
    ) in " ".join(done.output.split())


# --------------------------------------------------------------------------- exports, offline


def test_tamper_export_checkpoint_verifies_offline_and_a_tampered_one_fails(
    settings: Settings, make_run: MakeRun, tmp_path: Path
) -> None:
    run_id = _history(settings, make_run)
    export = json.loads(json.dumps(runs_service.quality_record(settings, run_id, export=True), default=str))
    key_line = audit_service.audit_key(settings)["public_key"]
    cp = export["checkpoint"]
    assert (cp["seq"], cp["head_hash"]) == (export["audit_head"]["seq"], export["audit_head"]["hash"])
    (tmp_path / "export.py").write_bytes((REPO / "flows" / "record" / "export.py").read_bytes())
    clean, forged = tmp_path / "clean.json", tmp_path / "forged.json"
    clean.write_text(json.dumps(export), encoding="utf-8")
    bad = json.loads(json.dumps(export))
    bad["checkpoint"]["seq"] += 7  # a holder who cut the chain moves the export's head to match
    bad["audit_head"]["seq"] = bad["checkpoint"]["seq"]
    forged.write_text(json.dumps(bad), encoding="utf-8")

    def offline(path: Path) -> subprocess.CompletedProcess[str]:
        """No site-packages (so no ``cryptography``: the pure-Python Ed25519), no sopflow, no database."""
        return subprocess.run(
            [sys.executable, "-I", "-S", str(tmp_path / "export.py"), str(path), "--key", key_line.split()[1]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={"PATH": os.environ.get("PATH", "")},
        )

    ok, fails = offline(clean), offline(forged)
    cli_fails = CliRunner().invoke(app, ["audit", "verify-export", str(forged), "--key", key_line])

    assert ok.returncode == 0, ok.stderr
    assert fails.returncode == 1
    expected = (
        f"checkpoint {cp['n']} (event {cp['seq'] + 7}): its signature does not verify with key {cp['key_id']}: "
        "the checkpoint was altered or forged"
    )
    assert expected in fails.stderr
    assert cli_fails.exit_code == 1
    assert expected in " ".join(cli_fails.output.split())


def test_tamper_export_from_another_key_fails_with_the_installations_key(
    settings: Settings, make_run: MakeRun, tmp_path: Path
) -> None:
    run_id = _history(settings, make_run)
    export = json.loads(json.dumps(runs_service.quality_record(settings, run_id, export=True), default=str))
    other = dataclasses.replace(settings, home=tmp_path / "other")
    (tmp_path / "other").mkdir()
    other_key = audit_service.audit_key(other, create=True)["public_key"]

    problems = audit_service.verify_export(export, other_key)

    assert problems == [
        f"checkpoint {export['checkpoint']['n']} (event {export['checkpoint']['seq']}): signed by key "
        f"{export['checkpoint']['key_id']}, which is not among the public keys it was checked with: forged, or "
        "signed with a key this installation never published"
    ]


# --------------------------------------------------------------------------- the key


def test_tamper_key_file_readable_by_others_is_refused(settings: Settings) -> None:
    load_signing_key(settings)
    settings.audit_key_path.chmod(0o644)

    with pytest.raises(ConfigError, match="readable or writable by others") as caught:
        load_signing_key(settings)

    assert f"chmod 600 {settings.audit_key_path}" in str(caught.value)


def test_tamper_new_key_is_owner_only_and_listed_with_every_older_one(settings: Settings, make_run: MakeRun) -> None:
    _history(settings, make_run)
    first = _checkpoint(settings)
    mode = settings.audit_key_path.stat().st_mode & 0o777
    settings.audit_key_path.rename(settings.home / "audit.key.retired")  # rotation: a new key
    with write_session(settings.database_url) as s:
        made = s.exec(select(StepRecord)).first()
        assert made is not None
        ledger.audit(s, actor="system", action="test.event", object_type="test", object_id="1", payload={})
    second = _checkpoint(settings)

    report = _verify(settings)

    assert mode == 0o600
    assert first.key_id != second.key_id
    assert report.ok, report.problems
    assert report.checkpoints == 2


def test_tamper_pure_python_ed25519_agrees_with_cryptography(settings: Settings) -> None:
    from flows.record.export import ed25519_verify

    key = load_signing_key(settings)
    for message in (b"", b"sopflow", bytes(range(256)) * 3):
        signature = __import__("base64").b64decode(key.sign(message))
        assert ed25519_verify(key.public, message, signature, pure=True)
        assert ed25519_verify(key.public, message, signature)
        assert not ed25519_verify(key.public, message + b"x", signature, pure=True)
        assert not ed25519_verify(key.public, message, signature[:-1] + bytes([signature[-1] ^ 1]), pure=True)


# --------------------------------------------------------------------------- streaming


def test_tamper_fast_event_hash_is_the_event_hash(settings: Settings, make_run: MakeRun) -> None:
    """verify_chain's quick hash must stay byte-for-byte ``_event_hash`` (a mismatch is re-checked by
    it, so a drift would only slow verification down: this test says so at once)."""
    _history(settings, make_run, steps=3)
    with write_session(settings.database_url) as s:
        ledger.audit(
            s, actor="ana", action="note", object_type="x", object_id="李", payload={"t": '温度 "q"'}, reason=None
        )
    with read_session(settings.database_url) as s:
        events = list(s.exec(select(AuditEvent)))
    assert len(events) > 5
    for ev in events:
        fast = ledger._event_hash_fast(
            ev.seq, ev.at, ev.actor, ev.action, ev.object_type, ev.object_id, ev.payload_json, ev.reason, ev.prev_hash
        )
        assert fast == ledger._event_hash(ev) == ev.hash
    # and from the columns as verify_chain reads them (on SQLite the stored text of the time)
    ev_t = AuditEvent.__table__  # type: ignore[attr-defined]
    with read_session(settings.database_url) as s:
        cols = ledger._raw_times(s, [ev_t.c[k] for k in ("seq", "at", "actor", "action", "object_type", "object_id")])
        rest = [ev_t.c[k] for k in ("payload_json", "reason", "prev_hash", "hash")]
        raw = list(s.execute(sa_select(*cols, *rest)))
    assert len(raw) == len(events)
    for *fields, stored in raw:
        assert ledger._event_hash_fast(*fields) == stored


def test_tamper_fast_row_check_agrees_with_row_payload(settings: Settings, make_run: MakeRun) -> None:
    """Every row of a clean record passes verify_chain's quick test (else the walk falls back to the
    ORM row by row: correct, and many times slower)."""
    _history(settings, make_run, steps=3)
    with read_session(settings.database_url) as s:
        for table, model in RECORD_TABLES.items():
            tt = model.__table__  # type: ignore[attr-defined]
            times = frozenset(c.key for c in tt.columns if isinstance(c.type, UTCDateTime))
            for row in s.execute(sa_select(*ledger._raw_times(s, tt.columns))):
                values = dict(zip([c.key for c in tt.columns], row, strict=True))
                quick = {k: ledger._at_iso(v) if k in times and v is not None else v for k, v in values.items()}
                ev = s.exec(
                    select(AuditEvent).where(AuditEvent.object_type == table, AuditEvent.object_id == row.id)
                ).first()
                assert ev is not None
                assert ev.payload_json == f'{{"row":{ledger._CANONICAL(quick)}}}', table


def test_tamper_worker_job_checkpoints_every_n_events_or_m_minutes(settings: Settings, make_run: MakeRun) -> None:
    from datetime import timedelta

    from flows.record.checkpoints import checkpoint_due
    from flows.services._worker_type import floor_jobs

    settings = dataclasses.replace(settings, checkpoint_events=10, checkpoint_minutes=30)
    assert ("audit_checkpoint", audit_service.checkpoint_job) in floor_jobs()
    _history(settings, make_run, steps=3)

    first = audit_service.checkpoint_job(settings)  # none yet: due at once
    again = audit_service.checkpoint_job(settings)  # the newest covers the head
    with write_session(settings.database_url) as s:
        for i in range(3):
            ledger.audit(s, actor="system", action="test.event", object_type="test", object_id=str(i), payload={})
    with read_session(settings.database_url) as s:
        few = checkpoint_due(s, settings)
        later = checkpoint_due(s, settings, now=utcnow() + timedelta(minutes=31))
    with write_session(settings.database_url) as s:
        for i in range(7):
            ledger.audit(s, actor="system", action="test.event", object_type="test", object_id=str(i), payload={})
    ten = audit_service.checkpoint_job(settings)

    assert (first, again, few, later, ten) == (1, 0, False, True, 1)
    with read_session(settings.database_url) as s:
        assert [cp.n for cp in s.exec(select(AuditCheckpoint))] == [1, 2]
