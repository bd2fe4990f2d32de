"""Issue 11 part 5: a database made by the last release (commit cf31c97, before versioned
migrations) is refused by this code with one line and nothing created, upgraded by
``sopflow db upgrade``, and then verifies and reads as it did under the release.

The release runs from its own files (``git archive cf31c97`` under tmp) with this environment's
Python: its own ``sopflow demo`` (its own Prefect server on a free port, its own home) writes the two
dose receipts, on SQLite and on PostgreSQL at once; its own ``runs`` and ``record`` print them. Then
this code takes over. Nothing is cached across test sessions.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from flows.record import schema
from flows.record.db import get_engine
from tests.conftest import PG_SERVER

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
GIT = shutil.which("git") or "git"
RELEASE = "cf31c97"
"""The commit main pointed at before schema versioning: the last release."""
READER = ("chen.jie", "demo-quality-mgr-1")
"""The release demo's quality manager, who may read every record of its institution."""


@dataclass
class Install:
    url: str
    home: Path
    checkout: Path

    def env(self, code: Path) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "SOPFLOW_HOME": str(self.home),
            "SOPFLOW_DATABASE_URL": self.url,
            "SOPFLOW_PASSWORD": READER[1],
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(code),
        }

    def run(self, code: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flows", *args],
            env=self.env(code),
            cwd=code,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def old(self, *args: str) -> str:
        out = self.run(self.checkout, *args)
        assert out.returncode == 0, f"release {RELEASE}: sopflow {' '.join(args)}: {out.stdout}{out.stderr}"
        return out.stdout

    def new(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(REPO, *args)

    def tables(self) -> set[str]:
        with get_engine(self.url).connect() as conn:
            return set(inspect(conn).get_table_names())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(name="release", scope="module")
def release_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Install]]:
    """The release's files, and its demo run once on SQLite and once on PostgreSQL (at the same time)."""
    found = subprocess.run([GIT, "-C", str(REPO), "cat-file", "-e", f"{RELEASE}^{{commit}}"], check=False)
    if found.returncode != 0:
        pytest.fail(f"the upgrade test needs commit {RELEASE} in the repository (a full clone, not a shallow one)")
    root = tmp_path_factory.mktemp("release")
    checkout = root / "checkout"
    archive = subprocess.run(
        [GIT, "-C", str(REPO), "archive", RELEASE, "flows", "sops", "templates"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(checkout, filter="data")
    name = f"migrate_release_{secrets.token_hex(4)}"
    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    installs = {
        "sqlite": Install(f"sqlite:///{root / 'sqlite' / 'sopflow.db'}", root / "sqlite", checkout),
        "postgres": Install(f"{PG_SERVER}/{name}", root / "postgres", checkout),
    }
    try:
        demos = {}
        for key, inst in installs.items():
            inst.home.mkdir()
            env = {**inst.env(checkout), "SOPFLOW_PREFECT_PORT": str(_free_port())}
            log = (inst.home / "demo.log").open("w")
            demos[key] = subprocess.Popen(
                [sys.executable, "-m", "flows", "demo"], env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT
            )
        for key, proc in demos.items():
            proc.wait(timeout=900)
            log_text = (installs[key].home / "demo.log").read_text()
            assert proc.returncode == 0, f"release {RELEASE} demo on {key}: {log_text}"
        yield installs
    finally:
        for inst in installs.values():
            get_engine(inst.url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _without_head(text_out: str) -> str:
    """A record's text without its last line, the chain head: reading a record as a user is itself an
    audited event in this code, so the head moves on by one read."""
    lines = text_out.rstrip("\n").splitlines()
    if lines[-1].startswith("signed checkpoint "):  # this code signs a checkpoint of the head it exports
        lines.pop()
    assert lines[-1].startswith("audit chain head: event "), lines[-1]
    return "\n".join(lines[:-1])


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_release_database_is_refused_then_upgraded_and_reads_and_verifies_as_before(release, backend):
    inst = release[backend]
    demo_log = (inst.home / "demo.log").read_text()
    verified = next(line for line in demo_log.splitlines() if line.startswith("audit verify: OK"))

    # What the release itself prints.
    runs_before = inst.old("runs")
    run_ids = [line.split()[0] for line in runs_before.splitlines() if line.strip()]
    assert len(run_ids) == 2  # receipt A (completed) and receipt B (rejected)
    records_before = {r: inst.old("record", r) for r in run_ids}
    json_before = {r: json.loads(inst.old("record", "--json", r)) for r in run_ids}
    with get_engine(inst.url).connect() as conn:
        events = conn.execute(text("SELECT seq, hash FROM sf_audit ORDER BY seq")).all()
    tables_before = inst.tables()
    assert schema.VERSION_TABLE not in tables_before

    # This code refuses it: one line, no traceback, nothing created.
    refused = inst.new("runs")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: the sopflow database {_where(inst.url)} "
        f"is at schema revision 0001, this sopflow needs {schema.head()}: back it up, then run `sopflow db upgrade`"
    ]
    assert "Traceback" not in refused.stdout + refused.stderr
    assert inst.tables() == tables_before

    status = inst.new("db", "status")
    assert status.returncode == 1
    assert "revision  0001 (made before versioning; recognised by its tables)" in status.stdout
    upgraded = inst.new("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "applied 0002" in upgraded.stdout
    assert f"applied {schema.head()}" in upgraded.stdout
    with get_engine(inst.url).connect() as conn:
        assert not schema.differences(conn)  # 0001 recognised + 0002 = exactly this code's models

    # The chain verifies as the release's own demo saw it, every old event keeps its hash.
    verify = inst.new("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Every old event and row verifies as the release's own demo saw it; this code also counts the
    # signatures it checks and the checkpoints (none yet: a note says so).
    assert verified.endswith(" record rows)"), verified
    assert verify.stdout.strip().splitlines()[-1].startswith(verified[:-1] + ", "), verify.stdout
    with get_engine(inst.url).connect() as conn:
        after = conn.execute(text("SELECT seq, hash FROM sf_audit WHERE seq <= :n ORDER BY seq"), {"n": len(events)})
        assert after.all() == events

    # The old runs read as before.
    runs_after = inst.new("runs")
    assert runs_after.returncode == 0, runs_after.stderr
    assert runs_after.stdout == runs_before
    for run_id in run_ids:
        rec = inst.new("record", run_id, "--as", READER[0])
        assert rec.returncode == 0, rec.stderr
        assert _without_head(rec.stdout) == _without_head(records_before[run_id])
        as_json = inst.new("record", run_id, "--json", "--as", READER[0])
        assert as_json.returncode == 0, as_json.stderr
        new, old = json.loads(as_json.stdout), json_before[run_id]
        head = new.pop("audit_head")
        assert head["seq"] > old.pop("audit_head")["seq"]
        assert new.pop("checkpoint")["seq"] == head["seq"]  # this code signs the head it exports
        for dev in new.get("deviations", []):  # where QA would sign its hold (issue 15): derived, not stored
            assert dev.pop("hold_step").startswith("deviation_")
        assert new == old


def _where(url: str) -> str:
    from flows.record.db import safe_url

    return safe_url(url)


_COMPARE = """
import sys
from sqlalchemy import create_engine
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel
import flows.record.tables
engine = create_engine(sys.argv[1])
with engine.connect() as conn:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": "sf_schema_version"})
    print(repr(compare_metadata(ctx, SQLModel.metadata)))
"""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_revision_0001_is_exactly_the_release_schema(backend, tmp_path):
    """Revision 0001 alone, compared by the release's own models: no difference."""
    from flows.record.db import migration_lock

    checkout = tmp_path / "checkout"
    archive = subprocess.run(
        [GIT, "-C", str(REPO), "archive", RELEASE, "flows"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(checkout, filter="data")
    if backend == "sqlite":
        url, name = f"sqlite:///{tmp_path / 'r1.db'}", None
    else:
        name = f"migrate_r1_{secrets.token_hex(4)}"
        url = f"{PG_SERVER}/{name}"
        admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        with migration_lock(url) as conn:
            schema.upgrade(conn, "0001")
        out = subprocess.run(
            [sys.executable, "-c", _COMPARE, url],
            env={**os.environ, "PYTHONPATH": str(checkout)},
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]", f"revision 0001 differs from {RELEASE}'s tables: {out.stdout}"
    finally:
        get_engine(url).dispose()
        if name:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
