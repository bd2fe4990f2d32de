"""Several web processes (issue 13): two real ``sopflow web`` processes (uvicorn) on two ports share
the sessions through the database. A user signs in through one and carries on through the other,
the form's CSRF token of one accepted by the other; a restart of the first signs nobody out; a
sign-out through one ends the session on both; an idle session is ended once, audited once,
whichever process notices it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from flows.record.db import read_session
from flows.record.tables import AuditEvent
from tests.fixtures_engine import ARRIVAL, PASSWORD, free_port, start_receipt, wait_for
from tests.waiting import eventually

pytestmark = pytest.mark.slow

COOKIE = "sopflow_session"


class Node:
    """One ``sopflow web`` process."""

    def __init__(self, env: dict[str, str], workers: int = 1) -> None:
        self.env = env
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows", "web", "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/login", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sopflow web exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            time.sleep(0.2)
        raise AssertionError("sopflow web did not answer within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class Visitor:
    """A browser: one session cookie, sent to whichever node it asks."""

    def __init__(self) -> None:
        self.token: str | None = None

    def request(self, node: Node, method: str, path: str, **kw: Any) -> httpx.Response:
        cookies = {COOKIE: self.token} if self.token else {}
        r = httpx.request(method, node.url + path, cookies=cookies, follow_redirects=False, timeout=60, **kw)
        if COOKIE in r.cookies:
            self.token = r.cookies[COOKIE]
        return r

    def csrf(self, node: Node, path: str) -> str:
        page = self.request(node, "GET", path)
        assert page.status_code == 200, page.text
        m = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert m, f"{path}: no CSRF field"
        return m.group(1)

    def sign_in(self, node: Node, username: str) -> None:
        csrf = self.csrf(node, "/login")
        r = self.request(
            node, "POST", "/login", data={"csrf": csrf, "username": username, "password": PASSWORD, "next": "/inbox"}
        )
        assert r.status_code == 303, r.text


@pytest.fixture(name="nodes")
def nodes_fixture(engine: Any) -> Iterator[tuple[Node, Node]]:
    env = {**os.environ}
    a, b = Node(env).start(), Node(env).start()
    yield a, b
    a.stop()
    b.stop()


def _actions_since(engine: Any, seq: int, who: str) -> list[str]:
    with read_session(engine.database_url) as s:
        return list(
            s.exec(
                select(AuditEvent.action)
                .where(AuditEvent.seq > seq, AuditEvent.object_id == who, col(AuditEvent.action).startswith("auth."))
                .order_by(col(AuditEvent.seq))
            )
        )


def _head(engine: Any) -> int:
    with read_session(engine.database_url) as s:
        return int(s.exec(select(AuditEvent.seq).order_by(col(AuditEvent.seq).desc())).first() or 0)


def test_web_session_started_on_one_process_carries_on_through_the_other(engine, nodes):
    a, b = nodes
    run_id = start_receipt(engine, coi="COI-NODES-0001")
    wait_for(engine, run_id, step="arrival")
    tech = Visitor()
    tech.sign_in(a, "tech")

    # The form comes from A, the review and the signature go to B with A's CSRF token.
    csrf = tech.csrf(a, f"/runs/{run_id}/steps/arrival")
    form = {"csrf": csrf, **{f"f.{k}": v for k, v in ARRIVAL.items()}}
    review = tech.request(b, "POST", f"/runs/{run_id}/steps/arrival/review", data=form)
    assert review.status_code == 200, review.text
    shown = re.search(r'name="shown" value="([0-9a-f]{64})"', review.text)
    assert shown
    signed = tech.request(
        b,
        "POST",
        f"/runs/{run_id}/steps/arrival/sign",
        data={**form, "shown": shown.group(1), "password": PASSWORD, "action": "sign"},
    )
    assert signed.status_code == 303, signed.text
    rec = wait_for(engine, run_id, step="identity_verification")
    assert {s["id"]: s["status"] for s in rec["steps"]}["arrival"] == "done"

    # A restarts: the session is in the database, nobody is signed out.
    a.stop()
    a.start()
    assert tech.request(a, "GET", "/inbox").status_code == 200

    # A message set on one process (the sign-out's) is shown by the other; the session ends on both.
    head = _head(engine)
    out = tech.request(b, "POST", "/logout", data={"csrf": tech.csrf(a, "/inbox")})
    assert out.status_code == 303
    token_after = tech.token
    assert "You are signed out." in tech.request(a, "GET", "/login").text
    stale = Visitor()
    stale.token = token_after
    for node in (a, b):
        assert stale.request(node, "GET", "/inbox").status_code == 303
    assert _actions_since(engine, head, "tech") == ["auth.logout"]


def test_web_session_a_forged_token_opens_nothing_and_only_hashes_are_kept(engine, nodes):
    _, b = nodes
    stranger = Visitor()
    stranger.token = "not-a-session-token"
    r = stranger.request(b, "GET", "/inbox")
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login")
    assert stranger.token != "not-a-session-token"  # a fresh anonymous session, nothing of the forged one
    with read_session(engine.database_url) as s:
        from flows.record.tables import WebSession

        keys = list(s.exec(select(WebSession.token_sha256)))
    assert stranger.token not in keys  # only the token's sha256 is kept


@pytest.fixture(name="quick_nodes")
def quick_nodes_fixture(engine: Any) -> Iterator[tuple[Node, Node]]:
    """Two web processes whose sessions end after 3 s without a request."""
    env = {**os.environ, "SOPFLOW_WEB_IDLE_MINUTES": "0.05"}
    a, b = Node(env).start(), Node(env).start()
    yield a, b
    a.stop()
    b.stop()


def test_web_idle_session_is_ended_and_audited_once_by_whichever_process_sees_it(engine, quick_nodes):
    a, b = quick_nodes
    doc = Visitor()
    doc.sign_in(a, "doc")
    assert doc.request(b, "GET", "/inbox").status_code == 200
    head = _head(engine)
    time.sleep(3.5)
    token = doc.token
    r = doc.request(b, "GET", "/inbox")
    assert r.status_code == 303
    assert "without activity" in doc.request(b, "GET", r.headers["location"]).text
    late = Visitor()
    late.token = token
    assert late.request(a, "GET", "/inbox").status_code == 303
    assert _actions_since(engine, head, "doc") == ["auth.idle"]


def _children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (from /proc/<pid>/stat's fourth field)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def test_web_workers_serve_one_port_from_several_processes_and_stop_together(engine):
    node = Node({**os.environ}, workers=2).start()
    try:
        assert node.proc is not None
        pid = node.proc.pid

        def two_workers() -> set[int] | None:  # the second worker may still be starting
            found = _children(pid)
            return found if len(found) >= 2 else None

        workers = eventually(two_workers, lambda: f"two worker processes of sopflow web: {_children(pid)}", limit=60)
        doc = Visitor()
        doc.sign_in(node, "doc")
        # Each request on a new connection, whichever worker takes it: the session is in the database.
        pages = [doc.request(node, "GET", "/inbox") for _ in range(12)]
        assert [p.status_code for p in pages] == [200] * 12
        assert all("Sign out" in p.text for p in pages)
    finally:
        node.stop()
    eventually(
        lambda: not [pid for pid in workers if os.path.exists(f"/proc/{pid}")],
        "a worker outlived sopflow web",
        limit=30,
    )


async def _tiny_page(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A page in two writes, as every response goes out: its head, then its body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _nodelay_of_accepted_connection(http: str) -> int:
    """Serve ``_tiny_page`` as ``sopflow web --workers N`` does (the listening socket bound by
    uvicorn's ``Config.bind_socket``, the options of ``flows.web.serving``), with protocol ``http``;
    make one kept-alive request and return the server side's TCP_NODELAY on that connection."""
    import asyncio
    import socket
    import threading

    import uvicorn

    from flows.web.serving import uvicorn_options

    options = uvicorn_options(host="127.0.0.1", port=free_port(), workers=2, trusted_proxies="127.0.0.1")
    options = {k: v for k, v in options.items() if k not in ("workers", "factory")} | {"http": http}
    config = uvicorn.Config(_tiny_page, **options)
    sock = config.bind_socket()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started, "the server never started", limit=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{options['port']}") as c:
            assert c.get("/").text == "ok"
            (conn,) = server.server_state.connections
            return conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_web_workers_send_each_response_at_once_not_after_the_clients_delayed_ack():
    """With ``--workers`` uvicorn binds the socket itself and asyncio leaves Nagle on for what it
    accepts (uvicorn issue #3149): every page after a connection's first waited ~40 ms for the
    browser's delayed ACK (52 ms a sequential inbox page with 2 workers, 6-9 ms with 1). The
    protocol ``sopflow web`` serves with turns Nagle off on each connection. The first assert shows
    this test sees the flaw: when an upgraded uvicorn passes it, flows.web.serving's protocol may go."""
    assert _nodelay_of_accepted_connection("h11") == 0
    assert _nodelay_of_accepted_connection("flows.web.serving:NoDelayH11Protocol") != 0
