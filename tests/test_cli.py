"""The ``sopflow`` command as a user runs it: real processes, real servers, exit codes and messages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_engine import (
    ARRIVAL,
    DEMO_STAFF,
    PASSWORD,
    free_port,
    start_receipt,
    wait_for,
)
from tests.waiting import eventually

pytestmark = pytest.mark.slow

PG = "postgres@127.0.0.1:5432"


def cli(
    env: dict[str, str], *args: str, password: str | None = PASSWORD, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {**env, "SOPFLOW_PASSWORD": password or "", "SOPFLOW_NEW_PASSWORD": PASSWORD, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "flows", *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _sets(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def test_cli_submit_out_of_range_prints_the_rule_and_no_traceback(engine):
    run_id = start_receipt(engine, coi="COI-CLI-0001")
    wait_for(engine, run_id, step="arrival")
    proc = cli(dict(os.environ), "submit", run_id, "arrival", "--as", "tech", *_sets({**ARRIVAL, "logger_max_c": "99"}))
    assert proc.returncode == 1
    assert "error: dose_receipt step 'arrival': logger_max_c: 99 °C is above the maximum 40 °C" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_start_with_an_unknown_sop_suggests_the_right_one(engine):
    proc = cli(dict(os.environ), "start", "dose_reciept", "--institution", "demo_hospital", "--as", "qm")
    assert proc.returncode == 1
    assert "Did you mean 'dose_receipt'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_runs_inbox_and_record_json(engine):
    import json

    run_id = start_receipt(engine, coi="COI-CLI-0002")
    wait_for(engine, run_id, step="arrival")
    assert run_id in ok(cli(dict(os.environ), "runs"))
    runs = json.loads(ok(cli(dict(os.environ), "runs", "--json")))
    assert {"id": run_id, "status": "waiting", "waiting_on": ["arrival"]}.items() <= next(
        r for r in runs if r["id"] == run_id
    ).items()
    inbox = ok(cli(dict(os.environ), "inbox", "--as", "tech"))
    assert f"{run_id}  dose_receipt/arrival  role cell_lab" in inbox
    assert "--set logger_max_c=…  (number, unit=°C min=-200.0 max=40.0)" in inbox
    items = json.loads(ok(cli(dict(os.environ), "inbox", "--as", "tech", "--json")))
    assert any(i["run_id"] == run_id and i["step_id"] == "arrival" for i in items)
    rec = json.loads(ok(cli(dict(os.environ), "record", run_id, "--as", "qa", "--json")))
    assert rec["run"]["id"] == run_id
    assert rec["audit_head"]["hash"]


def test_cli_reads_that_show_patient_data_sign_the_reader_in(engine):
    """`inbox --as X` with a wrong password shows nothing (it used to print X's inbox); `record` needs
    a user of the run's institution; both audited."""
    from sqlmodel import col, select

    from flows.record.db import read_session
    from flows.record.tables import AuditEvent

    run_id = start_receipt(engine, coi="COI-CLI-0003")
    wait_for(engine, run_id, step="arrival")
    with read_session(engine.database_url) as s:
        head = s.exec(select(AuditEvent.seq).order_by(col(AuditEvent.seq).desc())).first()
    wrong = cli(dict(os.environ), "inbox", "--as", "tech", password="not the password")
    assert wrong.returncode == 1
    assert "wrong user name or password" in wrong.stderr
    assert run_id not in wrong.stdout + wrong.stderr
    wrong = cli(dict(os.environ), "record", run_id, "--as", "qa", password="not the password")
    assert wrong.returncode == 1
    assert "H0001" not in wrong.stdout + wrong.stderr
    outsider = cli(dict(os.environ), "record", run_id, "--as", "est_shenjiang_hospital")
    assert outsider.returncode == 1
    assert "no such run among the runs you may read" in outsider.stderr  # as if there were none
    with read_session(engine.database_url) as s:
        events = list(s.exec(select(AuditEvent).where(AuditEvent.seq > head, AuditEvent.actor != "system")))
    assert [(e.action, e.object_id) for e in events if e.action.startswith(("auth.", "record."))] == [
        ("auth.failed", "tech"),
        ("auth.failed", "qa"),
        ("auth.ok", "est_shenjiang_hospital"),
        ("record.read.refused", run_id),
    ]


def test_cli_version_and_json_listings(engine):
    import json

    from flows import __version__

    assert ok(cli(dict(os.environ), "--version")).strip() == f"sopflow {__version__}"
    users = json.loads(ok(cli(dict(os.environ), "user", "list", "--json")))
    assert {"username": "tech", "roles": ["demo_hospital:cell_lab"]}.items() <= next(
        u for u in users if u["username"] == "tech"
    ).items()
    training = json.loads(ok(cli(dict(os.environ), "training", "list", "--user", "tech", "--json")))
    assert [(t["sop_id"], t["sop_version"]) for t in training] == [("dose_receipt", 1)]
    versions = json.loads(ok(cli(dict(os.environ), "sop", "versions", "dose_receipt", "--json")))
    assert versions[0]["sop_id"] == "dose_receipt"
    assert versions[0]["version"] == 1
    sops = json.loads(ok(cli(dict(os.environ), "sop", "list", "--institution", "demo_hospital", "--json")))
    assert "dose_receipt" in {s["id"] for s in sops}
    overdue = json.loads(ok(cli(dict(os.environ), "training", "overdue", "--json")))
    assert isinstance(overdue["overdue"], list)
    # Issue 15: and the coverage of each role that signs an Effective version (trained/needed).
    cover = {(c["sop_id"], c["role"]): (c["trained"], c["needed"]) for c in overdue["coverage"]}
    assert cover[("dose_receipt", "cell_lab")][1] == 1
    assert cover[("dose_receipt", "cell_lab")][0] >= 1  # tech is trained on v1 (above)
    text = ok(cli(dict(os.environ), "training", "overdue", "--institution", "demo_hospital"))
    assert "coverage (role: trained/needed):" in text
    assert "demo_hospital/dose_receipt v1 (effective)  cell_lab: " in text
    insts = json.loads(ok(cli(dict(os.environ), "institution", "list", "--json")))
    assert "demo_hospital" in {i["id"] for i in insts}


def _home_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SOPFLOW_"))}
    env.update({"SOPFLOW_HOME": str(tmp_path / "home"), "SOPFLOW_PREFECT_PORT": str(free_port()), **extra})
    return env


def _walk_receipt(env: dict[str, str], *, kill_while_waiting: bool, to_the_end: bool = True) -> str:
    """Users, a run, (a crash,) the signatures, through the CLI; returns the run id.

    Staff are set up in-process (the `user` and `training` commands have their own tests; each CLI
    call costs a second of start-up), the first of them through the CLI to show the path works."""
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.training import grant_training

    settings = _env_settings(env)
    ok(cli(env, "user", "add", "qa", "--name", DEMO_STAFF["qa"][0], "--role", "demo_hospital:qa"))  # first account
    ok(
        cli(
            env,
            "user",
            "add",
            "tech",
            "--name",
            DEMO_STAFF["tech"][0],
            "--role",
            "demo_hospital:cell_lab",
            "--as",
            "qa",
        )
    )
    for user in ("qa", "tech"):
        ok(
            cli(
                env,
                "training",
                "grant",
                user,
                "--institution",
                "demo_hospital",
                "--sop",
                "dose_receipt",
                "--version",
                "1",
                "--trainer",
                "Test Trainer",
                "--as",
                "qa",
            )
        )
    for user, (name, role) in DEMO_STAFF.items():
        if user not in ("qa", "tech"):
            qa = Officer("qa", PASSWORD)
            add_user(settings, user, name, PASSWORD, [("demo_hospital", role)], officer=qa)
            grant_training(settings, user, "demo_hospital", "dose_receipt", 1, trainer="Test Trainer", officer=qa)
    ok(cli(env, "sop", "establish", "demo_hospital", "--as", "qa"))  # the files become the first Effective versions
    out = ok(
        cli(
            env,
            "start",
            "dose_receipt",
            "--institution",
            "demo_hospital",
            "--as",
            "qm",
            *_sets({"product": "tecartus", "coi": "COI-CLI-0100", "lot": "LOT-9", "patient_id": "H0100"}),
        )
    )
    run_id = out.split()[2]
    _wait_cli(env, run_id, "waiting on arrival")
    if kill_while_waiting:
        home = Path(env["SOPFLOW_HOME"])
        for name in ("executor", "prefect-server"):
            pid = int((home / "run" / f"{name}.pid").read_text())
            os.killpg(pid, signal.SIGKILL)
        _wait_dead(home)
        assert cli(env, "server", "status").returncode == 1
        ok(cli(env, "server", "start"))
        assert "waiting on arrival" in ok(cli(env, "runs"))
    ok(cli(env, "submit", run_id, "arrival", "--as", "tech", *_sets(ARRIVAL)))
    _wait_cli(env, run_id, "waiting on identity_verification")
    if not to_the_end:
        return run_id
    ok(
        cli(
            env,
            "submit",
            run_id,
            "identity_verification",
            "--as",
            "pharm",
            "--set",
            "coi_matches=yes",
            "--set",
            "documents=complete",
        )
    )
    _wait_cli(env, run_id, "waiting on qa_acceptance")
    ok(cli(env, "submit", run_id, "qa_acceptance", "--as", "qa", "--set", "decision=approve"))
    _wait_cli(env, run_id, "completed")
    assert "audit verify: OK" in ok(cli(env, "audit", "verify"))
    return run_id


def _env_settings(env: dict[str, str]):
    """The settings a `sopflow` process with ``env`` sees (for in-process reads of its records)."""
    from dataclasses import replace

    from flows.config import get_settings

    return replace(
        get_settings(),
        home=Path(env["SOPFLOW_HOME"]),
        database_url=env.get("SOPFLOW_DATABASE_URL") or f"sqlite:///{env['SOPFLOW_HOME']}/sopflow.db",
    )


def _wait_cli(env: dict[str, str], run_id: str, text: str) -> None:
    """Wait until `sopflow runs` would show ``text`` for the run (read in-process: the CLI costs ~0.7 s a call)."""
    from flows.services import runs as runs_service

    settings = _env_settings(env)
    row: dict[str, object] = {}

    def shows() -> bool:
        nonlocal row
        row = next(r for r in runs_service.list_runs(settings) if r["id"] == run_id)
        shown = (
            f"{row['status']} waiting on {', '.join(row['waiting_on'])}" if row["waiting_on"] else str(row["status"])
        )  # type: ignore[arg-type]
        return text in shown

    eventually(shows, lambda: f"run {run_id} never showed {text!r}: {row}\n{_logs(settings.home)}")


def _logs(home: Path, lines: int = 60) -> str:
    """The tails of the executor's and the Prefect server's logs (what a failed wait needs to be explained)."""
    out = []
    for name in ("executor", "prefect-server"):
        log = home / "run" / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(none)"]
        out.append(f"--- {log} (last {lines} lines) ---\n" + "\n".join(tail))
    return "\n".join(out)


def _wait_dead(home: Path, timeout: float = 60) -> None:
    from flows.services.server import _alive

    deadline = time.monotonic() + timeout
    pids = [int((home / "run" / f"{n}.pid").read_text()) for n in ("executor", "prefect-server")]
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_run_survives_kill_of_server_and_executor_while_waiting(tmp_path):
    """kill -9 of the Prefect server and the executor while a run waits: after `server start` it still waits
    and completes when the input is submitted (embedded default: SQLite for both)."""
    env = _home_env(tmp_path)
    try:
        ok(cli(env, "server", "start"))
        run_id = _walk_receipt(env, kill_while_waiting=True, to_the_end=False)
        record = ok(cli(env, "record", run_id, "--as", "qa"))
        assert "done        arrival (record)" in record
        assert "waiting     identity_verification" in record
    finally:
        cli(env, "server", "stop")


@pytest.fixture(name="pg_databases")
def pg_databases_fixture() -> Iterator[tuple[str, str]]:
    """Two fresh databases on the real PostgreSQL server: sopflow's records and Prefect's."""
    import psycopg2

    names = (f"sopflow_prod_{uuid.uuid4().hex[:8]}", f"prefect_prod_{uuid.uuid4().hex[:8]}")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable ({exc}); .ci/run starts it")
    conn.autocommit = True
    with conn.cursor() as cur:
        for n in names:
            cur.execute(f'CREATE DATABASE "{n}"')
    yield names
    with conn.cursor() as cur:
        for n in names:
            cur.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
    conn.close()


@pytest.mark.postgres
def test_production_path_on_postgresql_for_sopflow_and_prefect(tmp_path, pg_databases):
    records, prefect_db = pg_databases
    env = _home_env(
        tmp_path,
        SOPFLOW_DATABASE_URL=f"postgresql+psycopg2://{PG}/{records}",
        SOPFLOW_PREFECT_DATABASE_URL=f"postgresql+asyncpg://{PG}/{prefect_db}",
    )
    try:
        ok(cli(env, "server", "start"))
        run_id = _walk_receipt(env, kill_while_waiting=False)  # the kill is tested on the embedded default
    finally:
        cli(env, "server", "stop")
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=records) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM sf_signature WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] == 3
    with (
        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=prefect_db) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT count(*) FROM flow_run WHERE parameters->>'run_id' = %s", (run_id,))
        assert cur.fetchone()[0] == 1
    assert not (tmp_path / "home" / "sopflow.db").exists()
    assert not (tmp_path / "home" / "prefect" / "prefect.db").exists()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SOPFLOW_PREFECT_PORT", "abc", "error: SOPFLOW_PREFECT_PORT: expected a number, got 'abc'"),
        ("SOPFLOW_LOCKOUT_THRESHOLD", "0", "error: SOPFLOW_LOCKOUT_THRESHOLD: expected a whole number of at least 1"),
        ("SOPFLOW_DATABASE_URL", "nosuchdb://x", "error: database URL 'nosuchdb://x' cannot be used"),
        ("SOPFLOW_HOME", "/proc/no-home", "error: database URL 'sqlite:////proc/no-home/sopflow.db' cannot be used"),
    ],
)
def test_cli_configuration_mistake_is_one_red_line_not_a_traceback(tmp_path, variable, value, message):
    """Issue 10: settings are read before any command runs; a mistake in them is a user's mistake."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOPFLOW_")}
    env.update({"SOPFLOW_HOME": str(tmp_path / "home"), "COLUMNS": "200", variable: value})
    done = subprocess.run(
        [sys.executable, "-m", "flows", "runs"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
