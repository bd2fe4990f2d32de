"""20 signed-in users at once against a real ``sopflow web`` process (issue 11): with history in the
database and steps waiting, every inbox and runs page answers 200, never a 500 from an exhausted
connection pool (``SOPFLOW_DB_POOL_SIZE`` / ``SOPFLOW_DB_MAX_OVERFLOW``). Counted, not timed; the
figures are bench/history.py's. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from flows.config import get_settings
from flows.record.db import write_session
from tests.conftest import MakeRun
from tests.fixtures_engine import PASSWORD
from tests.seed import seed_training, seed_user
from tests.test_current import FINISHED_STEPS, _run_like
from tests.test_web_nodes import Node, Visitor

pytestmark = pytest.mark.slow

USERS = 20


def test_web_serves_20_concurrent_signed_in_users_without_errors(
    db_url: str, make_run: MakeRun, tmp_path: Path
) -> None:
    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        for i in range(30):
            _run_like(s, made, steps=FINISHED_STEPS, coi=f"COI-DONE-{i:04d}")
        for i in range(10):
            _run_like(s, made, statuses=("scheduled", "waiting"), steps=(("arrival", "waiting"),), coi=f"COI-W-{i:04d}")
    env = {**os.environ, "SOPFLOW_HOME": str(tmp_path / "home"), "SOPFLOW_DATABASE_URL": db_url}
    for i in range(USERS):
        seed_user_env(env, f"tech{i:02d}")
    node = Node(env).start()
    try:
        visitors = [Visitor() for _ in range(USERS)]
        with ThreadPoolExecutor(USERS) as pool:
            list(pool.map(lambda iv: iv[1].sign_in(node, f"tech{iv[0]:02d}"), enumerate(visitors)))

            def browse(v: Visitor) -> list[tuple[int, str]]:
                out = []
                for path in ("/inbox", "/runs", "/inbox", "/runs?status=open", "/inbox"):
                    r = v.request(node, "GET", path)
                    out.append((r.status_code, path if r.status_code == 200 else r.text[:300]))
                return out

            results = [x for rows in pool.map(browse, visitors) for x in rows]
        assert [r for r in results if r[0] != 200] == []
        assert len(results) == USERS * 5
        # Each user sees the ten waiting steps (their role, their training).
        page = visitors[0].request(node, "GET", "/inbox").text
        assert page.count("COI-W-") >= 10
    finally:
        node.stop()


def seed_user_env(env: dict[str, str], username: str) -> None:
    """A cell-lab technician trained on dose_receipt v1, in the database the web process uses."""
    settings = replace(get_settings(), database_url=env["SOPFLOW_DATABASE_URL"])
    seed_user(settings, username, f"Tech {username}", PASSWORD, [("demo_hospital", "cell_lab")])
    seed_training(settings, username, "demo_hospital", "dose_receipt", 1)
