"""Leases (flows/engine/leases.py): one holder at a time, released when the holder's process dies,
on both databases. The outbox (flows/engine/outbox.py) on the record alone, delivering to a real
apprise receiver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select

from flows.cli.receiver import LocalReceiver
from flows.config import get_settings
from flows.engine.leases import Leases
from flows.engine.outbox import deliver_message, notify_once, queue, sweep_outbox
from flows.outputs.notify import channel_id, redact
from flows.record import ledger
from flows.record.db import read_session, write_session
from flows.record.tables import OutboxDelivery, OutboxMessage, utcnow
from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent


def test_lease_has_one_holder_at_a_time(db_url):
    a, b = Leases(db_url), Leases(db_url)
    try:
        assert a.try_hold("run:x")
        assert not b.try_hold("run:x")
        assert not b.is_free("run:x")
        assert b.try_hold("run:y")  # another key is another lease
        a.release("run:x")
        assert b.is_free("run:x")
        assert b.try_hold("run:x")
    finally:
        a.close()
        b.close()


def test_lease_owner_may_take_it_again_another_owner_may_not(db_url):
    leases = Leases(db_url)
    try:
        assert leases.try_hold("run:x")
        assert leases.try_hold("run:x")  # the same owner (the flow's own code, under the executor's claim)
        assert not leases.try_hold("run:x", owner="job:outbox")
        leases.release("run:x")
        assert not leases.try_hold("run:x", owner="job:outbox")  # still held once
        leases.release("run:x")
        assert leases.try_hold("run:x", owner="job:outbox")
    finally:
        leases.close()


def test_lease_of_a_killed_process_is_free_at_once(db_url, tmp_path):
    """kill -9 leaves no lock behind: PostgreSQL ends the session, the kernel the file lock."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from flows.engine.leases import Leases
        leases = Leases({db_url!r})
        assert leases.try_hold("run:held")
        print("held", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        mine = Leases(db_url)
        assert not mine.is_free("run:held")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        eventually(lambda: mine.is_free("run:held"), "the killed holder's lease was never released")
        mine.close()
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------- the outbox


@pytest.fixture(name="channels")
def channels_fixture(db_url, tmp_path, monkeypatch):
    with LocalReceiver() as rx:
        config = tmp_path / "notify.yaml"
        config.write_text(f'demo_hospital:\n  qa: ["{rx.url("qa")}"]\n', encoding="utf-8")
        monkeypatch.setenv("SOPFLOW_NOTIFY_CONFIG", str(config))
        monkeypatch.setenv("SOPFLOW_DATABASE_URL", db_url)
        yield get_settings(), rx


def _delivery_row(s, message_id: str, url: str, n: int, status: str, at: datetime) -> None:
    """Append a delivery row to the qa channel ``url`` as a holder of ``job:t`` would have."""
    ledger.append(
        s,
        OutboxDelivery(
            message_id=message_id,
            channel_sha256=channel_id(url),
            channel=redact(url),
            role="qa",
            n=n,
            status=status,
            holder="job:t",
            at=at,
        ),
        actor="system",
    )


def _rows(settings, key: str) -> list[str]:
    with read_session(settings.database_url) as s:
        msg = s.exec(select(OutboxMessage).where(OutboxMessage.key == key)).one()
        return [
            d.status
            for d in s.exec(
                select(OutboxDelivery).where(OutboxDelivery.message_id == msg.id).order_by(col(OutboxDelivery.n))
            )
        ]


def test_outbox_records_then_delivers_once_per_key(channels):
    settings, rx = channels
    kw = {"institution": "demo_hospital", "roles": ["qa"], "title": "t", "body": "hello once", "lease": "job:t"}
    first = notify_once(settings, key="test:once", **kw)
    again = notify_once(settings, key="test:once", **kw)  # the same cause again: nothing more is sent
    assert [d["status"] for d in first] == ["delivered"]
    assert [d["status"] for d in again] == ["delivered"]
    assert [m["message"] for m in rx.messages] == ["hello once"]
    assert _rows(settings, "test:once") == ["attempt", "delivered"]


def test_outbox_attempt_without_outcome_is_interrupted_not_resent(channels):
    """The next holder of the lease finds an attempt nobody finished: at most once."""
    settings, rx = channels
    with write_session(settings.database_url) as s:
        msg = queue(
            s, key="test:crashed", institution="demo_hospital", roles=["qa"], title="t", body="b", lease="job:t"
        )
        _delivery_row(s, msg.id, rx.url("qa"), 1, "attempt", utcnow())
        s.expunge(msg)
    out = deliver_message(settings, msg)
    assert [d["status"] for d in out] == ["interrupted"]
    assert rx.messages == []
    assert _rows(settings, "test:crashed") == ["attempt", "interrupted"]


def test_outbox_sweep_delivers_what_a_dead_holder_recorded_once(channels):
    settings, rx = channels
    with write_session(settings.database_url) as s:
        queue(
            s, key="test:orphan", institution="demo_hospital", roles=["qa"], title="t", body="orphan", lease="run:gone"
        )
    assert sweep_outbox(settings, older_than=0) == 1
    assert [m["message"] for m in rx.messages] == ["orphan"]
    assert sweep_outbox(settings, older_than=0) == 0  # delivered: never again
    assert json.dumps(_rows(settings, "test:orphan")) == json.dumps(["attempt", "delivered"])


def test_outbox_sweep_retries_a_failed_channel_only_once_its_back_off_is_over(channels):
    """The sweep reads only what is left to deliver: a failed channel past its back-off is sent
    again; one failed a moment ago waits; a delivered one and a message nobody could be told stay."""
    settings, rx = channels
    url = rx.url("qa")
    now = utcnow()
    with write_session(settings.database_url) as s:
        for key, rows in (
            ("test:due", [("attempt", 90), ("failed", 60)]),  # failed once, 60 s ago: the 30 s back-off is over
            ("test:not-yet", [("attempt", 5), ("failed", 1)]),
            ("test:done", [("attempt", 5), ("delivered", 4)]),
        ):
            msg = queue(s, key=key, institution="demo_hospital", roles=["qa"], title="t", body=key, lease="job:t")
            for n, (status, ago) in enumerate(rows, start=1):
                _delivery_row(s, msg.id, url, n, status, now - timedelta(seconds=ago))
    assert sweep_outbox(settings, older_than=0) == 1
    assert [m["message"] for m in rx.messages] == ["test:due"]
    assert _rows(settings, "test:due") == ["attempt", "failed", "attempt", "delivered"]
    assert _rows(settings, "test:not-yet") == ["attempt", "failed"]
    assert _rows(settings, "test:done") == ["attempt", "delivered"]
    assert sweep_outbox(settings, older_than=0) == 0


def test_outbox_message_to_roles_without_a_channel_is_unaddressed_once(channels):
    """Nobody to tell: one row says so, and no later flush or sweep tries again."""
    settings, rx = channels
    out = notify_once(
        settings,
        key="test:nobody",
        institution="demo_hospital",
        roles=["pharmacist"],
        title="t",
        body="b",
        lease="job:t",
    )
    assert out == []
    assert _rows(settings, "test:nobody") == ["unaddressed"]
    assert sweep_outbox(settings, older_than=0) == 0
    assert rx.messages == []
