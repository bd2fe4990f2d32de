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
from flows.web.app import INBOX_PAGE
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


def test_the_inbox_pages_most_urgent_first_and_sees_what_another_process_wrote(
    db_url: str, make_run: MakeRun, tmp_path: Path
) -> None:
    """45 steps waiting on one technician: 20 on the first page, 20 on the second, 5 on the third,
    none twice; a page that is not a whole number from 1 is refused; a run this process writes
    (another host, as far as the web process can tell) is on its next inbox: it keeps what waits
    only while the chain's head stays."""
    import re

    with write_session(db_url) as s:
        made = make_run(s, users=("ana",))
        for i in range(45):
            _run_like(s, made, statuses=("scheduled", "waiting"), steps=(("arrival", "waiting"),), coi=f"COI-P-{i:04d}")
    env = {**os.environ, "SOPFLOW_HOME": str(tmp_path / "home"), "SOPFLOW_DATABASE_URL": db_url}
    seed_user_env(env, "tech00")
    node = Node(env).start()
    try:
        v = Visitor()
        v.sign_in(node, "tech00")

        def cois(html: str) -> list[str]:
            return re.findall(r"COI-P-[0-9A-Z]{4,}", html)

        first = v.request(node, "GET", "/inbox").text
        second = v.request(node, "GET", "/inbox?page=2").text
        third = v.request(node, "GET", "/inbox?page=3").text
        assert INBOX_PAGE == 20
        assert [p.count('<li class="card') for p in (first, second, third)] == [20, 20, 5]
        assert "1–20 of 45 waiting" in first
        assert "41–45 of 45 waiting" in third
        assert 'href="/inbox?page=2"' in first
        assert 'href="/inbox?page=1"' in second
        assert 'href="/inbox?page=3"' in second
        assert 'data-refresh="/inbox/items?page=2"' in second  # the refresh keeps the page
        shown = cois(first) + cois(second) + cois(third)
        assert len(set(shown)) == 45 == len(shown)
        assert cois(v.request(node, "GET", "/inbox/items?page=2").text) == cois(second)
        for bad in ("0", "-1", "x", "1.5"):
            r = v.request(node, "GET", f"/inbox?page={bad}")
            assert r.status_code == 400
            assert "page: expected a whole number from 1" in r.text

        with write_session(db_url) as s:
            _run_like(s, made, statuses=("scheduled", "waiting"), steps=(("arrival", "waiting"),), coi="COI-P-NEW1")
        pages = "".join(v.request(node, "GET", f"/inbox?page={n}").text for n in (1, 2, 3))
        assert "COI-P-NEW1" in pages
        assert "of 46 waiting" in pages
    finally:
        node.stop()
