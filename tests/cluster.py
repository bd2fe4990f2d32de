"""A small sopflow installation of its own for the failover and exactly-once tests: a Prefect server
on PostgreSQL, sopflow's records on PostgreSQL, and sopflow workers as separate hosts.

Each worker runs under ``unshare -u`` with a hostname of its own (``host-a``, ``host-b``) and a
``SOPFLOW_HOME`` of its own; they share only what hosts of a real installation share: the two
databases and the Prefect API. The test process reads sopflow's records straight from the database
and Prefect's through its REST API (this process's Prefect client belongs to the session's own
server); it starts runs and signs steps through the ``sopflow`` command, as a person would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.config import Settings, get_settings
from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "cluster-password-1"
INSTITUTION = "fo_hospital"
HEADER = "# Owner: sopflow tests · Approval: none (test fixture) · Effective: n/a\n"
PROBE = """schema_version: 1
id: fo_probe
title: Failover probe
version: 1
params:
  tag: {type: text, max_length: 40}
steps:
  - id: go
    kind: record
    role: operator
    meaning: Started the probe
    fields:
      v: {type: number}
  - id: tell
    kind: notify
    to: [operator]
    message: "probe {{ params.tag }}"
  - id: ok
    kind: check
    expect: "go.v >= 0"
    on_fail: stop
  - id: confirm
    kind: record
    role: operator
    meaning: Confirmed the probe
    fields:
      v: {type: number}
"""
LATE = """schema_version: 1
id: fo_late
title: Escalation probe
version: 1
params:
  tag: {type: text, max_length: 40}
steps:
  - id: wait
    kind: record
    role: operator
    meaning: Signed at last
    timeout: 1s
    escalate_to: qa
    fields:
      v: {type: number}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unshare_works() -> bool:
    try:
        out = subprocess.run(
            [shutil.which("unshare") or "unshare", "-u", "sh", "-c", "hostname probe-x && hostname"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "probe-x"


class Cluster:
    def __init__(self, root: Path, pg_server: str, receiver_url: str) -> None:
        from sqlalchemy import create_engine, text

        self.root = root
        token = secrets.token_hex(4)
        self.pg_server = pg_server
        self.dbs = (f"sopflow_fo_{token}", f"prefect_fo_{token}")
        admin = create_engine(f"{pg_server}/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.dbs:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        self.database_url = f"{pg_server}/{self.dbs[0]}"
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.sops = root / "sops"
        self._write_sops(receiver_url)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.server = self._start_server()
        self.settings: Settings = dataclasses.replace(
            get_settings(), database_url=self.database_url, sops_dir=self.sops, prefect_api_url=self.api_url
        )
        self._seed()

    # -- set-up ----------------------------------------------------------------------------
    def _write_sops(self, receiver_url: str) -> None:
        inst = self.sops / INSTITUTION
        inst.mkdir(parents=True)
        (inst / "institution.yaml").write_text(
            HEADER + f"schema_version: 1\nid: {INSTITUTION}\nname: Failover Hospital\ntimezone: UTC\n"
            "roles:\n  operator: {label: Operator}\n  qa: {label: QA officer}\n",
            encoding="utf-8",
        )
        (inst / "products.yaml").write_text(HEADER + "schema_version: 1\nproducts: {}\n", encoding="utf-8")
        (inst / "fo_probe.yaml").write_text(HEADER + PROBE, encoding="utf-8")
        (inst / "fo_late.yaml").write_text(HEADER + LATE, encoding="utf-8")
        self.notify = self.root / "notify.yaml"
        self.notify.write_text(
            f'{INSTITUTION}:\n  operator: ["{receiver_url}operator"]\n  qa: ["{receiver_url}qa"]\n', encoding="utf-8"
        )

    def env(self, home: Path) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "SOPFLOW_TEST_PATIENCE")}
        return {
            **keep,
            "HOME": str(home),
            "SOPFLOW_HOME": str(home),
            "SOPFLOW_DATABASE_URL": self.database_url,
            "SOPFLOW_PREFECT_API_URL": self.api_url,
            "PREFECT_API_URL": self.api_url,
            "SOPFLOW_SOPS_DIR": str(self.sops),
            "SOPFLOW_TEMPLATES_DIR": str(REPO / "templates"),
            "SOPFLOW_NOTIFY_CONFIG": str(self.notify),
            "SOPFLOW_WEB_URL": "http://sopflow.test",  # messages link to the step's page: the run's id in the link
            "SOPFLOW_PASSWORD": PASSWORD,
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(REPO),
        }

    def _start_server(self) -> subprocess.Popen[bytes]:
        home = self.root / "prefect-server"
        home.mkdir()
        env = {
            **self.env(home),
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"{self.pg_server.replace('psycopg2', 'asyncpg')}/{self.dbs[1]}",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        log = (self.root / "prefect-server.log").open("ab")
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            assert proc.poll() is None, f"the cluster's Prefect server exited; see {self.root / 'prefect-server.log'}"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp,  # noqa: S310 (our own URL)
            ):
                return bool(json.loads(resp.read()))
            return False

        eventually(healthy, "the cluster's Prefect server never answered (its migrations on PostgreSQL)", every=0.5)
        return proc

    def _seed(self) -> None:
        from flows.services.guard import Officer
        from flows.services.versions import establish
        from tests.seed import seed_training, seed_user

        seed_user(self.settings, "fo_qa", "QA Officer", PASSWORD, [(INSTITUTION, "qa")])
        seed_user(self.settings, "fo_op", "Operator One", PASSWORD, [(INSTITUTION, "operator")])
        for sop_id in ("fo_probe", "fo_late"):
            seed_training(self.settings, "fo_op", INSTITUTION, sop_id, 1)
        establish(self.settings, INSTITUTION, Officer("fo_qa", PASSWORD))

    # -- workers ---------------------------------------------------------------------------
    def start_worker(
        self,
        host: str,
        *,
        fault: str | None = None,
        prefect_cli: bool = False,
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """A worker as host ``host``: its own hostname (``unshare -u``) and home; the same databases.
        ``prefect_cli``: started as operators start any Prefect worker,
        ``prefect worker start --type sopflow --pool sopflow``. ``extra_env`` overrides its
        environment (another database, another pool); ``wait=False`` returns at once (``wait_ready``)."""
        home = self.root / host
        (home / "run").mkdir(parents=True, exist_ok=True)
        (home / "run" / "executor.ready").unlink(missing_ok=True)
        env = {**self.env(home), **(extra_env or {})}
        if fault:
            env["SOPFLOW_FAULT"] = fault
        command = ["-m", "prefect", "worker", "start", "--type", "sopflow", "--pool", "sopflow"] if prefect_cli else []
        argv = [
            shutil.which("unshare") or "unshare",
            "-u",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            host,
            sys.executable,
            *(command or ["-m", "flows.services.worker"]),
        ]
        log = (home / "worker.log").open("ab")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
        self.workers[host] = proc
        if wait:
            self.wait_ready(host)
        return proc

    def wait_ready(self, host: str) -> None:
        """Until the worker of ``host`` polls (its ready file); fails when it exited instead."""
        proc, home = self.workers[host], self.root / host
        ready = home / "run" / "executor.ready"
        eventually(
            lambda: proc.poll() is not None or ready.exists(),
            f"worker {host} never got ready; see {home / 'worker.log'}",
        )
        assert proc.poll() is None, f"worker {host} exited: {(home / 'worker.log').read_text()[-2000:]}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method)  # noqa: S310 (our own URL)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=20) as resp:  # noqa: S310
            return json.loads(resp.read() or b"null")

    def online(self, host: str) -> dict[str, Any] | None:
        """The worker of ``host`` as Prefect lists it in the pool, once it is online."""
        with contextlib.suppress(OSError, ValueError):
            for w in self.api("POST", "/work_pools/sopflow/workers/filter", {}):
                if w["name"].startswith(f"sopflow-{host}-") and w.get("status") == "ONLINE":
                    return dict(w)
        return None

    def sweeps(self, host: str) -> int:
        """How many sweeps (every periodic job, each under its lease) the worker of ``host`` has made."""
        try:
            return int((self.root / host / "run" / "executor.sweeps").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def wait_sweeps(self, *hosts: str, more: int = 2) -> None:
        """Until each worker has swept ``more`` more times: what any of them would still do, it has done."""
        target = {h: self.sweeps(h) + more for h in hosts}
        eventually(
            lambda: all(self.sweeps(h) >= n for h, n in target.items()),
            lambda: f"workers swept only {[self.sweeps(h) for h in hosts]} times, not {list(target.values())}",
            every=0.2,
        )

    def kill(self, host: str) -> None:
        proc = self.workers.pop(host)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_workers(self) -> None:
        for host in list(self.workers):
            self.kill(host)

    # -- a person's commands ---------------------------------------------------------------
    def sopflow(self, *args: str) -> str:
        home = self.root / "desk"
        home.mkdir(exist_ok=True)
        out = subprocess.run(
            [sys.executable, "-m", "flows", *args], env=self.env(home), capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"sopflow {' '.join(args)}: {out.stdout}{out.stderr}"
        return out.stdout

    def start(self, sop_id: str, tag: str) -> str:
        out = self.sopflow("start", sop_id, "--institution", INSTITUTION, "--as", "fo_qa", "--set", f"tag={tag}")
        return out.split("started run ", 1)[1].split()[0]

    def sign(self, run_id: str, step: str, value: float = 1) -> None:
        self.wait_step(run_id, step, "waiting")
        self.sopflow("submit", run_id, step, "--as", "fo_op", "--set", f"v={value}")

    # -- what happened ---------------------------------------------------------------------
    def rows(self, sql: str, **params: Any) -> list[Any]:
        from sqlalchemy import text

        from flows.record.db import read_session

        with read_session(self.database_url) as s:
            return list(s.connection().execute(text(sql), params))

    def step_status(self, run_id: str, step: str) -> str | None:
        rows = self.rows(
            "SELECT status FROM sf_step_record WHERE run_id = :r AND step_id = :s ORDER BY n DESC LIMIT 1",
            r=run_id,
            s=step,
        )
        return str(rows[0][0]) if rows else None

    def wait_step(self, run_id: str, step: str, status: str, limit: float | None = None) -> None:
        kw = {"limit": limit} if limit else {}
        eventually(
            lambda: self.step_status(run_id, step) == status,
            lambda: f"run {run_id} step {step} is {self.step_status(run_id, step)!r}, never {status!r}",
            every=0.1,
            **kw,
        )

    def flow_run(self, run_id: str) -> dict[str, Any]:
        fr_id = self.rows("SELECT flow_run_id FROM sf_run WHERE id = :r", r=run_id)[0][0]
        return dict(self.api("GET", f"/flow_runs/{fr_id}"))

    def close(self) -> None:
        from sqlalchemy import create_engine, text

        from flows.record.db import get_engine

        self.stop_workers()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.server.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGKILL)
        get_engine(self.database_url).dispose()
        admin = create_engine(f"{self.pg_server}/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.dbs:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(name="cluster_receiver", scope="session")
def cluster_receiver_fixture() -> Iterator[Any]:
    """The cluster's notification channel: a real apprise ``json://`` receiver on loopback."""
    from flows.cli.receiver import LocalReceiver

    with LocalReceiver() as rx:
        yield rx


@pytest.fixture(name="cluster", scope="session")
def cluster_fixture(tmp_path_factory: pytest.TempPathFactory, cluster_receiver: Any) -> Iterator[Cluster]:
    """One installation for every test that needs workers as hosts (tests/test_failover.py,
    tests/test_worker_type.py); each test stops the workers it started."""
    from tests.conftest import PG_SERVER

    if not _unshare_works():
        pytest.fail("`unshare -u` does not work here: these tests need root to give workers their own hostnames")
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), PG_SERVER, cluster_receiver.url(""))
    try:
        yield cluster
    finally:
        cluster.close()
