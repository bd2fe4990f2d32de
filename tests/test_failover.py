"""Issue 12: runs survive the loss of the worker that holds them, and every effect happens once.

A sopflow installation of its own (tests/cluster.py): a Prefect server and sopflow's records on
PostgreSQL, workers as separate hosts (``unshare -u``: their own hostnames and homes). A worker is
killed with ``SIGKILL`` while it holds a run mid-step (the fault seam ``SOPFLOW_FAULT`` stops it at
an exact point: ``flows.engine.faults``); another worker takes the run over and finishes it. Every
notification is counted where it arrives: a real apprise ``json://`` receiver.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli.receiver import LocalReceiver
from tests.cluster import Cluster
from tests.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TAKEOVER_LIMIT = 60.0
"""Issue 12: a run held by a dead worker is taken over within a minute."""


@pytest.fixture(autouse=True)
def _no_workers_left(cluster: Cluster) -> Iterator[None]:  # each test starts the workers it needs
    yield
    cluster.stop_workers()


def _messages(receiver: LocalReceiver, text: str) -> list[dict]:
    return [m for m in list(receiver.messages) if text in m.get("message", "")]


def _assert_each_step_done_once(cluster: Cluster, run_id: str) -> None:
    rows = cluster.rows(
        "SELECT step_id, count(*) FROM sf_step_record WHERE run_id = :r AND status = 'done' GROUP BY step_id", r=run_id
    )
    assert rows, f"run {run_id} recorded no step"
    assert all(n == 1 for _, n in rows), f"a step of run {run_id} was recorded done twice: {rows}"


def _audit_ok(cluster: Cluster) -> None:
    from flows.record.db import read_session
    from flows.record.ledger import verify_chain

    with read_session(cluster.database_url) as s:
        report = verify_chain(s)
    assert report.ok, report.problems


def test_a_run_held_by_a_killed_worker_is_finished_by_a_worker_on_another_host(cluster, cluster_receiver):
    """host-a claims the run and stalls inside its notify step; with host-b up, host-a gets kill -9:
    host-b takes the run over within 60 s and finishes the step; nothing is recorded or sent twice."""
    cluster.start_worker("host-a", fault="stall@step.start:fo_probe/tell")
    run_id = cluster.start("fo_probe", "failover-1")
    cluster.sign(run_id, "go")
    stalled = Path(cluster.root / "host-a" / "worker.log")
    eventually(lambda: "SOPFLOW_FAULT: stall" in stalled.read_text(errors="replace"), "host-a never reached the step")
    fr = cluster.flow_run(run_id)
    assert fr["state_type"] == "RUNNING"
    assert fr["labels"]["prefect.worker.name"].startswith("sopflow-host-a-")
    cluster.start_worker("host-b")
    killed = time.monotonic()
    cluster.kill("host-a")

    cluster.wait_step(run_id, "confirm", "waiting", limit=TAKEOVER_LIMIT * 4)  # the outer guard of a busy machine
    took = time.monotonic() - killed
    assert took < TAKEOVER_LIMIT, f"host-b took {took:.0f} s to take the run over"
    assert cluster.flow_run(run_id)["labels"]["prefect.worker.name"].startswith("sopflow-host-b-")
    cluster.sign(run_id, "confirm")
    cluster.wait_step(run_id, "confirm", "done")
    _assert_each_step_done_once(cluster, run_id)
    eventually(lambda: _messages(cluster_receiver, "probe failover-1"), "the probe's message never arrived")
    cluster.wait_sweeps("host-b")  # the outbox's sweep has looked at it since: nothing may follow
    assert len(_messages(cluster_receiver, "probe failover-1")) == 1
    _audit_ok(cluster)


@pytest.mark.parametrize(
    ("point", "delivered"),
    [
        ("outbox.before_record", "once: the step re-runs and records it"),
        ("outbox.before_delivery", "once: recorded, delivered by the run that takes over"),
        ("outbox.after_delivery", "once: the attempt was recorded, so it is not sent again"),
    ],
)
def test_a_crash_at_any_point_of_a_notification_delivers_it_once(cluster, cluster_receiver, point, delivered):
    """A worker killed (SIGKILL) at each point of a notification; another finishes the run: the
    receiver gets the message exactly once."""
    tag = f"crash-{point.split('.')[1]}"
    cluster.start_worker("host-a", fault=f"kill@{point}:notify:")
    run_id = cluster.start("fo_probe", tag)
    cluster.sign(run_id, "go")
    eventually(lambda: cluster.workers["host-a"].poll() is not None, f"host-a never reached {point}")
    cluster.workers.pop("host-a")
    cluster.start_worker("host-b")
    cluster.wait_step(run_id, "confirm", "waiting")
    _assert_each_step_done_once(cluster, run_id)
    eventually(
        lambda: _messages(cluster_receiver, f"probe {tag}"), f"the message never arrived after a crash at {point}"
    )
    cluster.wait_sweeps("host-b")
    assert len(_messages(cluster_receiver, f"probe {tag}")) == 1, delivered
    states = cluster.rows(
        "SELECT d.status FROM sf_outbox_delivery d JOIN sf_outbox o ON o.id = d.message_id WHERE o.key = :k ORDER BY d.n",
        k=f"notify:{run_id}:tell",
    )
    expected = ["attempt", "interrupted"] if point == "outbox.after_delivery" else ["attempt", "delivered"]
    assert [s for (s,) in states] == expected
    _audit_ok(cluster)


def test_two_workers_escalate_an_overdue_step_once(cluster, cluster_receiver):
    """Both workers sweep every few seconds; the escalation job runs under its lease: one message, one row."""
    cluster.start_worker("host-a")
    cluster.start_worker("host-b")
    run_id = cluster.start("fo_late", "late-1")
    cluster.wait_step(run_id, "wait", "waiting")
    eventually(
        lambda: cluster.rows("SELECT id FROM sf_escalation WHERE run_id = :r", r=run_id), "the step was never escalated"
    )

    # The message links to the step's page, which names the run (flows.outputs.messages).
    def escalations() -> list[dict]:
        return [m for m in _messages(cluster_receiver, run_id) if "overdue" in m.get("title", "").lower()]

    eventually(escalations, "no escalation arrived")
    cluster.wait_sweeps("host-a", "host-b")
    assert len(cluster.rows("SELECT id FROM sf_escalation WHERE run_id = :r", r=run_id)) == 1
    assert len(escalations()) == 1


def test_two_workers_started_together_on_an_empty_database_both_come_up(cluster):
    """Issue 11: on main, one of two executors started together on an empty PostgreSQL database died
    with ``UniqueViolation`` in ``init_db`` (both ran ``create_all``). Now the first migrates under
    the schema lock and the other finds the database current; both sweep. Their own pool, so they
    take none of the cluster's runs."""
    from sqlalchemy import create_engine, text

    from flows.record import schema
    from flows.record.db import get_engine, schema_status

    token = secrets.token_hex(4)
    name = f"sopflow_fo_empty_{token}"
    admin = create_engine(f"{cluster.pg_server}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{cluster.pg_server}/{name}"
    hosts = ("host-e1", "host-e2")
    try:
        for host in hosts:
            cluster.start_worker(
                host, extra_env={"SOPFLOW_DATABASE_URL": url, "SOPFLOW_WORK_POOL": f"empty-{token}"}, wait=False
            )
        for host in hosts:
            cluster.wait_ready(host)
        cluster.wait_sweeps(*hosts, more=1)
        st = schema_status(url)
        assert (st.state, st.revision) == ("current", schema.head())
        for host in hosts:
            log = (cluster.root / host / "worker.log").read_text()
            assert "Traceback" not in log, log[-3000:]
    finally:
        for host in hosts:
            if host in cluster.workers:
                cluster.kill(host)
        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
