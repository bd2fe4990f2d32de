"""The web's safety rules (issue 15, part 8) against two real ``sopflow web`` processes (uvicorn, as
``sopflow web`` serves) on one SQLite database, and headless Chromium for the sign-in page:

- an SOP page, its diff and the library are only for users with a role at the institution; anyone
  else gets exactly the 404 of a page that does not exist;
- a run id (whole or a six-character prefix) of another institution's run answers exactly like an
  id of no run, on the pages and on the API;
- the sign-in page says one thing for an unknown account, a wrong password, a locked and a
  disabled account;
- a stranger's failed sign-ins from one client make that client wait (on both processes, and
  after a restart) and never lock the account: its owner signs in from another client; a client
  that tries many accounts waits for all of them; failures of the password asked again inside the
  owner's own session (a form that signs) do lock the account, as the e-signature rule wants;
- Permissions-Policy on every response, HSTS only over HTTPS (a trusted proxy's
  ``X-Forwarded-Proto``), never when an untrusted client claims it.

uvicorn believes ``X-Forwarded-For`` from 127.0.0.1 (the default ``SOPFLOW_TRUSTED_PROXIES``), so
these requests stand for clients behind a proxy at several addresses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlmodel import select

from flows.config import get_settings
from flows.record import ledger
from flows.record.accounts import append_account_event, is_locked
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import SopRun, SopVersion, User, new_id
from flows.record.users import find_user
from flows.record.versions import append_version_event
from flows.sop.model import SopDefinition
from tests.conftest import DEMO_PRODUCTS, DEMO_SOP, FIXED_AT, PASSWORD
from tests.seed import seed_user
from tests.test_web_browser import ARGS, CHROMIUM
from tests.test_web_nodes import Node

pytestmark = pytest.mark.slow

COOKIE = "sopflow_session"
CLIENT_LIMIT = 8
"""``SOPFLOW_CLIENT_FAILURE_LIMIT`` of the processes here (the default is 20)."""
STAFF = {
    "reader": [("demo_hospital", "nurse")],
    "owner": [("demo_hospital", "nurse")],
    "signer": [("demo_hospital", "qa")],
    "locked.one": [("demo_hospital", "nurse")],
    "disabled.one": [("demo_hospital", "nurse")],
    "outsider": [("shenjiang_hospital", "ward_nurse")],
    "sj.qa": [("shenjiang_hospital", "qa")],
    "sj.gateway": [("shenjiang_hospital", "coordinator")],
}


class Site:
    def __init__(self, root: Path) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SOPFLOW_")},
            "SOPFLOW_HOME": str(root / "home"),
            "SOPFLOW_DATABASE_URL": f"sqlite:///{root / 'sopflow.db'}",
            "SOPFLOW_CLIENT_FAILURE_LIMIT": str(CLIENT_LIMIT),
        }
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            self.settings = get_settings()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.run_id = ""


def _store(site: Site) -> None:
    """Two versions of demo_hospital's dose_receipt (the diff compares them) and a run on the first."""
    settings = site.settings
    init_db(settings.database_url)
    for username, grants in STAFF.items():
        seed_user(settings, username, username.title(), PASSWORD, grants)
    text = DEMO_SOP.read_text(encoding="utf-8")
    texts = [text, re.sub(r"(?m)^version: 1$", "version: 2", text).replace("{en: CAR-T", "{en: Revised CAR-T", 1)]
    with write_session(settings.database_url) as s:
        versions = []
        for body in texts:
            sop = SopDefinition.model_validate(yaml.safe_load(body))
            v = SopVersion(
                institution="demo_hospital",
                sop_id=sop.id,
                version=sop.version,
                schema_version=sop.schema_version,
                sha256=ledger.sha256_hex(body.encode()),
                text=body,
                stored_at=FIXED_AT,
            )
            ledger.append(s, v, actor="test-seed", action="sop_version.store")
            versions.append((v, sop))
        append_version_event(
            s, versions[0][0], "effective", actor="test-seed", data={"effective_at": FIXED_AT.isoformat()}, at=FIXED_AT
        )
        append_version_event(s, versions[1][0], "draft", actor="test-seed", data={}, at=FIXED_AT)
        version, sop = versions[0]
        reader = find_user(s, "reader")
        assert reader is not None
        product = yaml.safe_load(DEMO_PRODUCTS.read_text(encoding="utf-8"))["products"]["axi_cel"]
        run = SopRun(
            institution="demo_hospital",
            sop_version_id=version.id,
            sop_id=sop.id,
            sop_version=sop.version,
            sop_sha256=version.sha256,
            schema_version=sop.schema_version,
            params_json=json.dumps(
                {"product": "axi_cel", "coi": "COI-SAFE-0001", "lot": "LOT-9", "patient_id": "P-SAFE-1"}, sort_keys=True
            ),
            product_json=json.dumps(product, sort_keys=True),
            flow_run_id=new_id(),
            started_by=reader.id,
            started_at=FIXED_AT,
        )
        ledger.append(s, run, actor=reader.id, action="run.start")
        site.run_id = run.id
        outsider = find_user(s, "outsider")
        assert outsider is not None
        twin = SopRun(  # a run elsewhere whose id starts like this one's: a prefix must not notice it
            id=run.id[:10] + new_id()[10:],
            institution="shenjiang_hospital",
            sop_version_id=version.id,
            sop_id=sop.id,
            sop_version=sop.version,
            sop_sha256=version.sha256,
            schema_version=sop.schema_version,
            params_json=run.params_json.replace("COI-SAFE-0001", "COI-TWIN-0001"),
            flow_run_id=new_id(),
            started_by=outsider.id,
            started_at=FIXED_AT,
        )
        ledger.append(s, twin, actor=outsider.id, action="run.start")
        locked, disabled = find_user(s, "locked.one"), find_user(s, "disabled.one")
        assert locked is not None
        assert disabled is not None
        append_account_event(s, locked, "locked", actor="system", data={"failures": 5, "threshold": 5})
        append_account_event(s, disabled, "disabled", actor="test-seed")


@pytest.fixture(name="site", scope="module")
def site_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Node, Node]]:
    site = Site(tmp_path_factory.mktemp("websafe"))
    _store(site)
    a, b = Node(site.env).start(), Node(site.env).start()
    yield site, a, b
    a.stop()
    b.stop()


class Browser:
    """One visitor (a cookie jar) at one client address, asking any process."""

    def __init__(self, address: str | None = None) -> None:
        self.token: str | None = None
        self.headers = {"X-Forwarded-For": address} if address else {}

    def request(self, node: Node, method: str, path: str, **kw: Any) -> httpx.Response:
        cookies = {COOKIE: self.token} if self.token else {}
        headers = {**self.headers, **kw.pop("headers", {})}
        r = httpx.request(
            method, node.url + path, cookies=cookies, headers=headers, follow_redirects=False, timeout=60, **kw
        )
        if COOKIE in r.cookies:
            self.token = r.cookies[COOKIE]
        return r

    def csrf(self, node: Node, path: str = "/login") -> str:
        page = self.request(node, "GET", path)
        m = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert m, f"{path}: no CSRF field ({page.status_code})"
        return m.group(1)

    def login(self, node: Node, username: str, password: str = PASSWORD) -> httpx.Response:
        csrf = self.csrf(node)
        return self.request(
            node, "POST", "/login", data={"csrf": csrf, "username": username, "password": password, "next": "/inbox"}
        )


def signed_in(node: Node, username: str, address: str) -> Browser:
    who = Browser(address)
    r = who.login(node, username)
    assert r.status_code == 303, r.text
    return who


def _locked(site: Site, username: str) -> bool:
    with read_session(site.settings.database_url) as s:
        user = s.exec(select(User).where(User.username == username)).one()
        return is_locked(s, user.id)


def test_websafe_sop_page_and_diff_are_a_404_like_no_page_for_a_user_without_a_role(site):
    _, a, _ = site
    reader = signed_in(a, "reader", "198.51.100.1")
    page = reader.request(a, "GET", "/sops/demo_hospital/dose_receipt")
    assert page.status_code == 200  # the control: the page is there for a role-holder
    assert "dose_receipt" in page.text
    diff = reader.request(a, "GET", "/sops/demo_hospital/dose_receipt/diff?old=1&new=2")
    assert diff.status_code == 200
    assert "Revised" in diff.text
    assert 'href="/sops/demo_hospital/dose_receipt"' in reader.request(a, "GET", "/sops").text

    outsider = signed_in(a, "outsider", "198.51.100.2")
    nowhere = outsider.request(a, "GET", "/no/such/page")
    assert nowhere.status_code == 404
    for path in (
        "/sops/demo_hospital/dose_receipt",
        "/sops/demo_hospital/dose_receipt/diff?old=1&new=2",
        "/sops/demo_hospital/dose_receipt/diff",
        "/sops/demo_hospital/no_such_sop",
        "/sops/demo_hospital/dose_receipt/edit",
    ):
        r = outsider.request(a, "GET", path)
        assert (r.status_code, r.text) == (404, nowhere.text), path
    assert "Revised" not in nowhere.text
    library = outsider.request(a, "GET", "/sops").text
    assert "/sops/demo_hospital/" not in library
    assert "/sops/shenjiang_hospital/" in library  # their own institution's SOPs stay listed


def test_websafe_a_run_of_another_institution_answers_like_no_run(site):
    from flows.services.guard import Officer
    from flows.services.tokens import create_token

    s, a, b = site
    run_id = s.run_id
    reader = signed_in(a, "reader", "198.51.100.3")
    for path in (f"/runs/{run_id}", f"/runs/{run_id[:6]}", f"/runs/{run_id[:10]}"):
        page = reader.request(a, "GET", path)
        assert page.status_code == 200, path  # whole id and prefix name the run: the twin elsewhere is not counted
        assert "COI-SAFE-0001" in page.text

    outsider = signed_in(a, "outsider", "198.51.100.4")
    missing = "0" * len(run_id)
    answers = {}
    for name, rid in (("theirs", run_id), ("prefix", run_id[:12]), ("none", missing), ("short", missing[:6])):
        for suffix in ("", "/steps/arrival", "/steps/arrival/correct"):
            r = outsider.request(b, "GET", f"/runs/{rid}{suffix}")
            answers[(name, suffix)] = (r.status_code, r.text)
    assert {status for status, _ in answers.values()} == {404}
    assert len({text for _, text in answers.values()}) == 1, "the 404s differ"
    body = answers[("none", "")][1]
    assert "no such run among the runs you may read" in body
    assert "COI-SAFE-0001" not in body
    assert "demo_hospital" not in body

    mine = reader.request(a, "GET", "/chain?coi=COI-SAFE-0001").text  # the control: the reader sees the dose's run
    assert run_id[:8] in mine
    theirs = outsider.request(a, "GET", "/chain?coi=COI-SAFE-0001").text
    nobodys = outsider.request(a, "GET", "/chain?coi=COI-SAFE-9999").text
    assert run_id[:8] not in theirs
    assert theirs.replace("COI-SAFE-0001", "COI") == nobodys.replace("COI-SAFE-9999", "COI")

    _, token = create_token(
        s.settings,
        "probe",
        "shenjiang_hospital",
        "sj.gateway",
        ["runs:read", "records:read"],
        Officer("sj.qa", PASSWORD),
    )
    api = {}
    for rid in (run_id, run_id[:12], missing, missing[:6]):
        for suffix in ("", "/record"):
            r = httpx.get(f"{a.url}/api/v1/runs/{rid}{suffix}", headers={"Authorization": f"Bearer {token}"})
            api[(rid, suffix)] = (r.status_code, r.content)
    assert {status for status, _ in api.values()} == {404}
    assert len({body for _, body in api.values()}) == 1, api
    assert json.loads(api[(missing, "")][1]) == {
        "error": "no such run among the runs you may read; the runs list shows them",
        "field": None,
    }


def test_websafe_sign_in_says_one_thing_for_unknown_wrong_locked_and_disabled(site):
    _, a, _ = site
    from playwright.sync_api import sync_playwright

    attempts = {
        "unknown": ("no.such.person", PASSWORD),
        "wrong password": ("reader", "not the password"),
        "locked": ("locked.one", PASSWORD),
        "disabled": ("disabled.one", PASSWORD),
    }
    shown: dict[str, str] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for kind, (username, password) in attempts.items():
                context = browser.new_context(extra_http_headers={"X-Forwarded-For": f"192.0.2.{len(shown) + 10}"})
                page = context.new_page()
                page.goto(f"{a.url}/login")
                page.fill("#username", username)
                page.fill("#password", password)
                with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as resp:
                    page.click("form[action='/login'] button.primary")
                assert resp.value.status == 401, kind
                shown[kind] = page.inner_text("#login-error")
                context.close()
        finally:
            browser.close()
    assert len(set(shown.values())) == 1, shown
    assert "wrong user name or password, or the account may not sign in now" in shown["locked"]
    assert "locked" not in shown["locked"]
    assert "disabled" not in shown["disabled"]


def test_websafe_a_strangers_failures_make_their_client_wait_and_never_lock_the_owner(site):
    s, a, b = site
    stranger = Browser("203.0.113.9")
    for _ in range(s.settings.lockout_threshold):
        r = stranger.login(a, "owner", "guessing 1234")
        assert r.status_code == 401
    waits = stranger.login(a, "owner")  # the right password now: the client still waits, unchecked
    assert waits.status_code == 429
    assert int(waits.headers["retry-after"]) >= 1
    assert "too many failed sign-ins from this address" in waits.text
    assert stranger.login(b, "owner").status_code == 429  # the other process knows it (the database)
    assert not _locked(s, "owner")

    owner = Browser("198.51.100.77")  # the owner, elsewhere, on the other process
    assert owner.login(b, "owner").status_code == 303
    assert owner.request(b, "GET", "/inbox").status_code == 200

    a.stop()  # a restart forgets nothing
    a.start()
    assert stranger.login(a, "owner").status_code == 429

    sprayer = Browser("203.0.113.50")  # one client, many accounts: it waits for every one
    for n in range(CLIENT_LIMIT):
        assert sprayer.login(b, f"guess.{n}", "guessing 1234").status_code == 401
    assert sprayer.login(b, "reader").status_code == 429
    assert Browser("203.0.113.51").login(b, "reader").status_code == 303  # its neighbour does not


def test_websafe_wrong_passwords_in_the_owners_own_session_lock_the_account(site):
    s, a, b = site
    signer = signed_in(a, "signer", "198.51.100.9")
    for n in range(s.settings.lockout_threshold):
        csrf = signer.csrf(a, "/sops/demo_hospital/dose_receipt")
        r = signer.request(
            a if n % 2 else b,
            "POST",
            "/sops/demo_hospital/dose_receipt/review",
            data={"csrf": csrf, "note": "checked", "months": "12", "password": "not my password"},
        )
        assert r.status_code == 303
    page = signer.request(a, "GET", "/sops/demo_hospital/dose_receipt").text
    assert "account locked after 5 failed sign-ins" in page  # the owner is told, in their own session
    assert _locked(s, "signer")


def test_websafe_permissions_policy_everywhere_and_hsts_only_over_https(site):
    from flows.web.base import HSTS

    s, a, _ = site
    plain = [
        httpx.get(a.url + path)
        for path in ("/login", "/api/v1/health", "/static/app.css", "/no/such/page", "/api/v1/nowhere")
    ]
    for r in plain:
        assert "camera=()" in r.headers["permissions-policy"], r.url
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert "strict-transport-security" not in r.headers, r.url
    login = plain[0]
    assert "frame-ancestors 'none'" in login.headers["content-security-policy"]  # the pages' own headers stay
    assert login.headers["x-frame-options"] == "DENY"

    https = httpx.get(a.url + "/login", headers={"X-Forwarded-Proto": "https"})  # from the trusted proxy
    assert https.headers["strict-transport-security"] == HSTS
    assert "secure" in https.headers["set-cookie"].lower()
    assert "permissions-policy" in https.headers

    untrusted = Node({**s.env, "SOPFLOW_TRUSTED_PROXIES": "10.255.255.1"}).start()  # 127.0.0.1 is no proxy now
    try:
        claimed = httpx.get(untrusted.url + "/login", headers={"X-Forwarded-Proto": "https"})
        assert claimed.status_code == 200
        assert "strict-transport-security" not in claimed.headers
        assert "permissions-policy" in claimed.headers
    finally:
        untrusted.stop()
