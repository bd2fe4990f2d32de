"""The deployment smoke test (issue 13): the production topology of deploy/ as processes on one
machine, driven through a dose receipt the way hospital systems and staff reach it.

    PostgreSQL (127.0.0.1:5432)      two fresh databases: sopflow's records, Prefect's
    a Prefect server on PostgreSQL   `prefect server start`, as deploy/systemd/sopflow-prefect.service
    two workers                      `sopflow server start` with an external Prefect API, each its own SOPFLOW_HOME
    two web processes                `sopflow web`, each its own SOPFLOW_HOME (no shared disk but the results block)

Every sopflow process has a home of its own, as it would on its own host: what they share is the
database, the Prefect server and the result-storage block, nothing else. The script sets up the
installation from the CLI (the first account, the administrator's key, a second institution, staff,
training, the SOPs, an API token), starts a receipt through the API on web 1, signs its three
steps through web 2, web 1 and web 2 in turn, waits for it to complete, fetches its document from
both web processes, and ends with `sopflow audit verify`. It prints the time of each stage.

Run it as `scripts/smoke` (which builds the wheel into a fresh virtual environment first) or with a
sopflow environment's python: `python scripts/smoke.py [--keep]`. Exit 0 when everything held.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

PG = os.environ.get("SMOKE_PG", "postgres@127.0.0.1:5432")
PASSWORD = "smoke-password-1"
BIN = Path(sys.executable).parent
STAFF = {  # user: (printed name, role at demo_hospital), added by the first account, qa
    "tech": ("Li Wei", "cell_lab"),
    "pharm": ("Zhang Min", "pharmacist"),
}
ARRIVAL = {
    "arrived_at": "2026-11-25T09:40:00+08:00",
    "courier": "SF 1234",
    "shipper_id": "DS-0042",
    "seal_intact": "yes",
    "logger_max_c": "-171.5",
    "transit_hours": "18.5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Smoke:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.homes: list[Path] = []
        self.t0 = time.monotonic()
        self.stages: list[tuple[str, float]] = []
        suffix = uuid.uuid4().hex[:8]
        self.dbs = (f"sopflow_smoke_{suffix}", f"prefect_smoke_{suffix}")
        self.prefect_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.prefect_port}/api"
        self.base = {
            k: v for k, v in os.environ.items() if not k.startswith(("SOPFLOW_", "PREFECT_")) and k != "DO_NOT_TRACK"
        }
        self.base |= {
            "SOPFLOW_DATABASE_URL": f"postgresql+psycopg2://{PG}/{self.dbs[0]}",
            "SOPFLOW_PREFECT_API_URL": self.api_url,
            "SOPFLOW_RESULTS_STORAGE": "block:local-file-system/sopflow-results",
            "SOPFLOW_POLL_MAX_SECONDS": "0.5",
            # One audit key for the installation, copied to every host (docs/deploy.md): a host that made
            # its own would sign checkpoints the others cannot verify.
            "SOPFLOW_AUDIT_KEY_FILE": str(work / "keys" / "audit.key"),
            "SOPFLOW_AUDIT_PUBLIC_KEYS": str(work / "keys" / "audit-keys.pub"),
            "COLUMNS": "200",
        }

    # -- plumbing ------------------------------------------------------------------------------
    def stage(self, name: str) -> None:
        now = time.monotonic()
        self.stages.append((name, now - self.t0))
        print(f"[{now - self.t0:6.1f} s] {name}", flush=True)

    def env(self, home: str, **extra: str) -> dict[str, str]:
        path = self.work / home
        path.mkdir(exist_ok=True)
        return {**self.base, "SOPFLOW_HOME": str(path), **extra}

    def sopflow(self, home: str, *args: str, password: str = PASSWORD, check: bool = True, **extra: str) -> str:
        env = self.env(home, SOPFLOW_PASSWORD=password, SOPFLOW_NEW_PASSWORD=password, **extra)
        proc = subprocess.run(
            [str(BIN / "sopflow"), *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        if check and proc.returncode != 0:
            raise SystemExit(f"sopflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except (httpx.TransportError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.work}")

    # -- the topology --------------------------------------------------------------------------
    def databases(self, create: bool) -> None:
        import psycopg2

        user, host = PG.split("@")
        conn = psycopg2.connect(host=host.split(":")[0], port=int(host.split(":")[1]), user=user, dbname="test")
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in self.dbs:
                cur.execute(f'CREATE DATABASE "{name}"' if create else f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()

    def prefect_server(self) -> None:
        home = self.work / "prefect-server"
        home.mkdir()
        env = {
            **self.base,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{PG}/{self.dbs[1]}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)]
        self.spawn("prefect-server", argv, env)
        self.wait("the Prefect server", lambda: httpx.get(f"{self.api_url}/health", timeout=2).json() is True, 180)

    def results_block(self) -> None:
        """The results block every worker writes to and reads from (on hosts: a shared mount or object storage)."""
        shared = self.work / "shared-results"
        shared.mkdir()
        code = (
            "from prefect.filesystems import LocalFileSystem; "
            f"LocalFileSystem(basepath={str(shared)!r}).save('sopflow-results', overwrite=True)"
        )
        env = {**self.base, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.work / "prefect-server")}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)

    def workers(self) -> None:
        for n in (1, 2):
            print(self.sopflow(f"worker-{n}", "server", "start").strip())
            self.homes.append(self.work / f"worker-{n}")

    def webs(self) -> list[str]:
        urls = []
        for n in (1, 2):
            port = free_port()
            argv = [str(BIN / "sopflow"), "web", "--host", "127.0.0.1", "--port", str(port)]
            self.spawn(f"web-{n}", argv, self.env(f"web-{n}"))
            url = f"http://127.0.0.1:{port}"
            self.wait(f"web {n}", lambda u=url: httpx.get(f"{u}/api/v1/health", timeout=2).status_code == 200)  # type: ignore[misc]
            urls.append(url)
        return urls

    def stop(self) -> None:
        for home in self.homes:
            self.sopflow(home.name, "server", "stop", check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


class Visitor:
    """A browser: one session cookie, sent to whichever web process it asks."""

    def __init__(self, username: str) -> None:
        self.username = username
        self.token: str | None = None

    def request(self, base: str, method: str, path: str, **kw: Any) -> httpx.Response:
        cookies = {"sopflow_session": self.token} if self.token else {}
        r = httpx.request(method, base + path, cookies=cookies, follow_redirects=False, timeout=60, **kw)
        if "sopflow_session" in r.cookies:
            self.token = r.cookies["sopflow_session"]
        return r

    def csrf(self, base: str, path: str) -> str:
        page = self.request(base, "GET", path)
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        if page.status_code != 200 or not found:
            raise SystemExit(f"{base}{path}: {page.status_code}, no form:\n{page.text[:500]}")
        return found.group(1)

    def sign_in(self, base: str) -> None:
        data = {"csrf": self.csrf(base, "/login"), "username": self.username, "password": PASSWORD, "next": "/inbox"}
        if self.request(base, "POST", "/login", data=data).status_code != 303:
            raise SystemExit(f"{self.username} could not sign in at {base}")

    def sign(self, base: str, run_id: str, step: str, values: dict[str, str]) -> None:
        form = {"csrf": self.csrf(base, f"/runs/{run_id}/steps/{step}"), **{f"f.{k}": v for k, v in values.items()}}
        review = self.request(base, "POST", f"/runs/{run_id}/steps/{step}/review", data=form)
        shown = re.search(r'name="shown" value="([0-9a-f]{64})"', review.text)
        if review.status_code != 200 or not shown:
            raise SystemExit(f"review of {step} at {base}: {review.status_code}\n{review.text[:800]}")
        signed = self.request(
            base,
            "POST",
            f"/runs/{run_id}/steps/{step}/sign",
            data={**form, "shown": shown.group(1), "password": PASSWORD, "action": "sign"},
        )
        if signed.status_code != 303:
            raise SystemExit(f"signing {step} at {base}: {signed.status_code}\n{signed.text[:800]}")


def run(smoke: Smoke) -> None:
    smoke.databases(create=True)
    smoke.stage(f"PostgreSQL: databases {', '.join(smoke.dbs)}")
    (smoke.work / "keys").mkdir(exist_ok=True)
    smoke.sopflow("keys", "audit", "key", "--create")  # the installation's key, before any host needs it
    smoke.stage("the installation's audit key made, to be shared by every host")
    smoke.prefect_server()
    smoke.stage(f"Prefect server on PostgreSQL at {smoke.api_url}")
    smoke.results_block()
    smoke.workers()
    smoke.stage("two workers ready (result storage: block local-file-system/sopflow-results)")
    web1, web2 = smoke.webs()
    smoke.stage(f"two web processes: {web1}, {web2}")

    # The installation, from the CLI, as hospital IT and QA would set it up (on an admin host).
    smoke.sopflow("admin", "user", "add", "qa", "--name", "Qian An", "--role", "demo_hospital:qa")  # bootstrap
    smoke.sopflow("admin", "admin", "init")
    smoke.sopflow("admin", "institution", "add", "shenjiang_hospital", "--qa", "sj.qa", "--name", "Sun Jing 孙静")
    for user, (name, role) in {**STAFF, "his.gateway": ("HIS gateway (system)", "coordinator")}.items():
        smoke.sopflow("admin", "user", "add", user, "--name", name, "--role", f"demo_hospital:{role}", "--as", "qa")
    for user in [*STAFF, "qa"]:  # signers are trained on the version they sign; the gateway is not
        smoke.sopflow(
            "admin", "training", "grant", user, "--institution", "demo_hospital", "--sop", "dose_receipt",
            "--version", "1", "--as", "qa",
        )  # fmt: skip
    smoke.sopflow("admin", "sop", "establish", "demo_hospital", "--as", "qa")
    token = smoke.sopflow(
        "admin", "token", "create", "--name", "HIS gateway", "--institution", "demo_hospital",
        "--account", "his.gateway", "--scope", "runs:start", "--scope", "runs:read", "--as", "qa",
    ).strip()  # fmt: skip
    smoke.stage("installation set up from the CLI: bootstrap, admin key, second institution, staff, SOPs, API token")

    auth = {"Authorization": f"Bearer {token}"}
    params = {"product": "tecartus", "coi": "COI-SMOKE-0001", "lot": "LOT-S1", "patient_id": "H0001"}
    r = httpx.post(f"{web1}/api/v1/runs", json={"sop_id": "dose_receipt", "params": params}, headers=auth, timeout=60)
    if r.status_code != 201:
        raise SystemExit(f"API start: {r.status_code} {r.text}")
    run_id = r.json()["run_id"]
    smoke.stage(f"run {run_id} started through the API on web 1")

    def waits_on(step: str) -> Callable[[], bool]:
        return lambda: (
            httpx.get(f"{web2}/api/v1/runs/{run_id}", headers=auth, timeout=30).json()["waiting_on"] == [step]
        )

    people = {u: Visitor(u) for u in ("tech", "pharm", "qa")}
    for (user, step, values), web in zip(
        [
            ("tech", "arrival", ARRIVAL),
            ("pharm", "identity_verification", {"coi_matches": "yes", "documents": "complete"}),
            ("qa", "qa_acceptance", {"decision": "approve"}),
        ],
        (web2, web1, web2),
        strict=True,
    ):
        smoke.wait(f"{step} to wait", waits_on(step))
        visitor = people[user]
        if visitor.token is None:
            visitor.sign_in(web1 if web == web2 else web2)  # signed in on the other process than the one it signs on
        t = time.monotonic()
        visitor.sign(web, run_id, step, values)
        smoke.stage(
            f"{step} signed by {user} through {'web 2' if web == web2 else 'web 1'} ({time.monotonic() - t:.2f} s)"
        )

    status: dict[str, Any] = {}

    def completed() -> bool:
        status.update(httpx.get(f"{web1}/api/v1/runs/{run_id}", headers=auth, timeout=30).json())
        return status["status"] in ("completed", "rejected", "stopped", "failed")

    smoke.wait("the run to end", completed)
    if status["status"] != "completed":
        raise SystemExit(f"the run ended {status['status']}: {status.get('detail')}")
    smoke.stage("the receipt completed")

    record = json.loads(smoke.sopflow("web-1", "record", run_id, "--as", "qa", "--json"))
    docs = record["documents"]
    if len(docs) < 2:
        raise SystemExit(f"expected the receipt's HTML and PDF, got {docs}")
    qa = people["qa"]
    for doc in docs:
        for web in (web1, web2):
            got = qa.request(web, "GET", f"/documents/{doc['id']}/download")
            if got.status_code != 200 or hashlib.sha256(got.content).hexdigest() != doc["sha256"]:
                raise SystemExit(f"document {doc['id']} from {web}: {got.status_code}, not the recorded sha256")
    smoke.stage(f"{len(docs)} documents served by both web processes, sha256 as recorded")

    verified = smoke.sopflow("admin", "audit", "verify")
    print(verified.strip())
    smoke.stage("audit chain verified")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="Leave the folder with the logs (and the databases).")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sopflow-smoke-"))
    smoke = Smoke(work)
    ok = False
    print(f"sopflow smoke test in {work} (python {sys.executable}); load {os.getloadavg()[0]:.2f}", flush=True)
    try:
        run(smoke)
        ok = True
    finally:
        smoke.stop()
        if not args.keep:
            smoke.databases(create=False)
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            for log in sorted(work.glob("*.log")):
                print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    total = time.monotonic() - smoke.t0
    print(f"smoke test {'passed' if ok else 'FAILED'} in {total:.1f} s; load {os.getloadavg()[0]:.2f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
