"""Issue 11 part 5: sopflow's tables are versioned (Alembic, flows/record/migrations), a database
behind or ahead of the code refuses to run with one line and creates nothing, and processes that
start together on an empty database migrate it once and all come up.

The upgrade from the last release (cf31c97, made by that commit's own demo) is in
tests/test_upgrade_release.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text
from sqlmodel import SQLModel

from flows.errors import SchemaVersionError
from flows.record import db, schema
from flows.record.db import get_engine, init_db, migration_lock, schema_status, upgrade_db
from tests.conftest import PG_SERVER

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database with no table at all, on SQLite and on PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
        yield url
        get_engine(url).dispose()
        return
    name = f"migrate_{secrets.token_hex(4)}"
    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _tables(url: str) -> set[str]:
    with get_engine(url).connect() as conn:
        return set(inspect(conn).get_table_names())


def _at(url: str, revision: str) -> None:
    """Bring an empty database to ``revision`` only (as an older sopflow would have left it)."""
    with migration_lock(url) as conn:
        schema.upgrade(conn, revision)


def _sopflow(url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "SOPFLOW_HOME": str(home),
        "SOPFLOW_DATABASE_URL": url,
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "flows", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_migrations_at_head_equal_the_models(db_url):
    """A table or column in flows/record/tables.py without its migration fails here, on both databases."""
    with get_engine(db_url).connect() as conn:
        diffs = schema.differences(conn)
    assert not diffs, (
        "the migrations at head do not build the models (write the next revision: "
        f"flows/record/migrations/README.md): {diffs}"
    )


def test_migrations_compare_catches_a_table_without_a_migration(db_url):
    """The check above can fail: a model table that no revision creates shows up as a difference."""
    extra = MetaData()
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(extra)
    Table("sf_future", extra, Column("id", Integer, primary_key=True))
    with get_engine(db_url).connect() as conn:
        diffs = schema.differences(conn, extra)
    assert [(d[0], d[1].name) for d in diffs] == [("add_table", "sf_future")]


def test_an_empty_database_is_brought_to_head_by_the_first_use(empty_url):
    assert schema_status(empty_url).state == "empty"
    init_db(empty_url)
    st = schema_status(empty_url)
    assert (st.state, st.revision, st.versioned) == ("current", schema.head(), True)
    assert schema.VERSION_TABLE == "sf_schema_version"
    assert schema.VERSION_TABLE in _tables(empty_url)


def test_a_database_behind_the_code_refuses_every_command_and_creates_nothing(empty_url, tmp_path):
    _at(empty_url, "0001")
    before = _tables(empty_url)
    with pytest.raises(
        SchemaVersionError, match=rf"schema revision 0001, this sopflow needs {schema.head()}"
    ) as caught:
        init_db(empty_url)
    assert "run `sopflow db upgrade`" in str(caught.value)
    for args in (["runs"], ["audit", "verify"]):
        out = _sopflow(empty_url, tmp_path, *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (args, out.stderr)
        assert "sopflow db upgrade" in lines[0]
        assert "Traceback" not in out.stdout + out.stderr
    assert _tables(empty_url) == before  # nothing was created before the refusal
    status = _sopflow(empty_url, tmp_path, "db", "status")
    assert status.returncode == 1
    assert "revision  0001" in status.stdout
    assert "behind" in status.stdout
    assert "pending 0002" in status.stdout


def test_the_web_and_the_worker_refuse_a_database_behind_the_code(empty_url, tmp_path):
    import dataclasses

    from flows.config import get_settings
    from flows.web import create_app

    _at(empty_url, "0001")
    before = _tables(empty_url)
    settings = dataclasses.replace(get_settings(), database_url=empty_url)
    with pytest.raises(SchemaVersionError, match=r"sopflow db upgrade"):
        create_app(settings)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "SOPFLOW_HOME": str(tmp_path),
        "SOPFLOW_DATABASE_URL": empty_url,
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO),
    }
    worker = subprocess.run(
        [sys.executable, "-m", "flows.services.worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert worker.returncode == 1
    assert "sopflow worker not started" in worker.stderr
    assert "sopflow db upgrade" in worker.stderr
    assert "Traceback" not in worker.stderr
    assert _tables(empty_url) == before


def test_sopflow_db_upgrade_brings_it_to_head_and_then_everything_runs(empty_url, tmp_path):
    _at(empty_url, "0001")
    out = _sopflow(empty_url, tmp_path, "db", "upgrade")
    assert out.returncode == 0, out.stderr
    assert "applied 0002" in out.stdout
    assert f"the database is at revision {schema.head()}" in out.stdout
    assert upgrade_db(empty_url) == []  # already at head: nothing to do
    runs = _sopflow(empty_url, tmp_path, "runs")
    assert runs.returncode == 0, runs.stderr
    status = _sopflow(empty_url, tmp_path, "db", "status")
    assert status.returncode == 0
    assert "current" in status.stdout


def test_a_database_ahead_of_the_code_refuses_clearly(empty_url, tmp_path):
    init_db(empty_url)
    with get_engine(empty_url).begin() as conn:
        conn.execute(text("UPDATE sf_schema_version SET version_num = '9999'"))
    db._current.discard(empty_url)  # this process found it current a moment ago
    with pytest.raises(SchemaVersionError, match=r"at schema revision 9999, newer than this sopflow"):
        init_db(empty_url)
    out = _sopflow(empty_url, tmp_path, "runs")
    assert out.returncode == 1
    assert f"newer than this sopflow (its newest is {schema.head()})" in out.stderr
    assert "Traceback" not in out.stderr
    upgrade = _sopflow(empty_url, tmp_path, "db", "upgrade")
    assert upgrade.returncode == 1
    assert "newer than this sopflow" in upgrade.stderr
    with pytest.raises(SchemaVersionError, match="newer than this sopflow"):
        upgrade_db(empty_url)


def test_tables_of_no_release_without_a_version_refuse(empty_url, tmp_path):
    with get_engine(empty_url).begin() as conn:
        conn.execute(text("CREATE TABLE sf_user (id VARCHAR PRIMARY KEY)"))
    out = _sopflow(empty_url, tmp_path, "runs")
    assert out.returncode == 1
    assert "has sopflow tables but no schema version, and they match no release (1 tables: sf_user)" in out.stderr
    assert _tables(empty_url) == {"sf_user"}


def test_migrations_the_head_a_command_checks_without_alembic_is_the_scripts_head():
    """``schema.HEAD`` spares every command Alembic's import: a new revision must move it too."""
    assert schema.head() == schema.HEAD


def test_a_database_made_before_versioning_is_recognised_by_its_tables(empty_url):
    """The tables as cf31c97 (or a later unversioned commit) made them, with no version table."""
    _at(empty_url, "0001")
    with get_engine(empty_url).begin() as conn:
        conn.execute(text("DROP TABLE sf_schema_version"))
    st = schema_status(empty_url)
    assert (st.state, st.revision, st.versioned) == ("behind", "0001", False)
    assert upgrade_db(empty_url) == st.pending
    st = schema_status(empty_url)
    assert (st.state, st.revision, st.versioned) == ("current", schema.head(), True)


_STARTER = """
import sys, time
from flows.record.db import init_db
from flows.record import db, schema
from sqlalchemy import text
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))  # every process starts at the same instant
engine = init_db(url)
with engine.connect() as conn:
    print(conn.execute(text("SELECT version_num FROM " + schema.VERSION_TABLE)).scalar_one())
"""


@pytest.mark.slow
def test_processes_starting_together_on_an_empty_database_all_come_up(empty_url, tmp_path):
    """Four processes open an empty database at the same instant: one migrates (under the schema
    lock), the others wait for it and find it current. On main, create_all raced: UniqueViolation."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    at = time.time() + 4.0  # after every interpreter has imported sopflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STARTER, empty_url, str(at)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert stdout.strip() == schema.head()
    with get_engine(empty_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sf_schema_version")).scalar_one() == 1
        assert not schema.differences(conn)


def _old_payload(row: SQLModel, *, without: str) -> dict:
    """What an event written before column ``without`` existed holds for ``row``."""
    from flows.record.ledger import canonical, row_payload

    payload = json.loads(canonical(row_payload(row)))
    del payload[without]
    return payload


def test_a_column_added_later_leaves_old_rows_matching_their_events(monkeypatch):
    """A row's recorded content stays what it was: a column its event does not name matches while it
    holds the value the migration gave old rows (NULL, or ``info["backfill"]``), and only then."""
    from datetime import UTC, datetime

    from flows.record.ledger import row_changes
    from flows.record.tables import User

    row = User(username="old.user", printed_name="Old User", password_hash="x", created_at=datetime.now(UTC))
    recorded = _old_payload(row, without="created_by")  # "created_by" came after this row: NULL in old rows
    assert row_changes(recorded, row) == []
    row.created_by = "someone"  # set behind sopflow's back after the upgrade
    assert row_changes(recorded, row) == ["created_by"]
    column = User.__table__.c.created_by  # type: ignore[attr-defined]
    monkeypatch.setitem(column.info, "backfill", "migration")  # a NOT NULL column with the value old rows get
    row.created_by = "migration"
    assert row_changes(recorded, row) == []
    recorded["printed_name"] = "Someone Else"  # a recorded column still counts as ever
    assert row_changes(recorded, row) == ["printed_name"]
