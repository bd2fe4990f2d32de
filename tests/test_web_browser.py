"""The web app in real headless Chromium (Debian's ``chromium``, driven by Playwright): every demo
role signs in, and two whole dose receipts go through the pages alone, against the real Prefect
server and executor of the test session.

Receipt A: the quality manager starts it (after a refused wrong password); a user holding both
the cell-lab and the pharmacist role performs the arrival (a value out of range is refused next
to its field, a wrong signing password is refused in the signature dialog), then is refused when
verifying their own arrival; the pharmacist verifies, QA accepts, the receipt document renders.
Entered text and a printed name carry HTML: it is shown as text in the dialog, the verify form,
the run page, the inbox header and the document (view and download), never as markup.
Receipt B: the logger shows -120 °C, the transit check fails and opens a deviation, QA rejects
the dose in a signed disposition. Screenshots (phone width) of the inbox, a step form and a run
timeline in English and Chinese go to ``$SOPFLOW_SCREENSHOTS`` or a temporary folder, printed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_engine import ARRIVAL, DEMO_STAFF, PASSWORD, free_port, wait_for
from tests.waiting import LIMIT, eventually

BROWSER_WAIT_MS = int(LIMIT * 1000 / 2)
"""How long a page waits for what it expects (the inbox refreshes every 5 s; signing may take seconds under load)."""


CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.slow


def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` (what ``sopflow web`` serves) with uvicorn in a thread on a free port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    eventually(lambda: server.started, "the web server did not start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(name="web_url", scope="module")
def web_url_fixture(engine: Any) -> Iterator[str]:
    """``sopflow web`` on the engine's settings."""
    from flows.web import create_app

    yield from serve(create_app(engine))


@pytest.fixture(name="browser", scope="module")
def browser_fixture() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium package", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(name="shots", scope="module")
def shots_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("SOPFLOW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Person:
    """One staff member at their own (phone-sized) browser."""

    def __init__(self, browser: Any, base: str, username: str) -> None:
        self.base, self.username = base, username
        self.context = browser.new_context(viewport=PHONE, locale="en-US")
        self.page = self.context.new_page()
        self.page.set_default_timeout(BROWSER_WAIT_MS)

    def go(self, path: str) -> Any:
        self.page.goto(self.base + path)
        return self.page

    def login(self, password: str = PASSWORD) -> Any:
        page = self.go("/login")
        page.fill("#username", self.username)
        page.fill("#password", password)
        page.click("form[action='/login'] button.primary")
        return page

    def open_step(self, run_id: str, step: str) -> Any:
        """From the inbox, the way a person gets there."""
        page = self.go("/inbox")
        page.click(f"a[href='/runs/{run_id}/steps/{step}']")
        return page

    def fill(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            radio = self.page.locator(f"input[type=radio][name='f.{name}'][value='{value}']")
            if radio.count():
                radio.check()
            else:
                self.page.fill(f"#f-{name}", value)

    def review(self) -> None:
        self.page.click("form.stepform button.primary")

    def sign(self, password: str = PASSWORD) -> None:
        self.page.fill("#sign-password", password)
        self.page.click("#sign-dialog button[value=sign]")

    def shot(self, folder: Path, name: str) -> None:
        self.page.screenshot(path=str(folder / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


def _start_receipt(qm: Person, coi: str, lot: str) -> str:
    page = qm.go("/runs/new")
    page.click("a[href='/runs/new/demo_hospital/dose_receipt']")
    page.select_option("#f-product", "tecartus")
    qm.fill({"coi": coi, "lot": lot, "patient_id": "H0001"})
    page.fill("#start-password", PASSWORD)
    page.click("form button.primary")
    page.wait_for_url("**/runs/*")
    return page.url.rstrip("/").rsplit("/", 1)[-1]


ARRIVAL_FORM = {**{k: v for k, v in ARRIVAL.items() if k != "arrived_at"}, "arrived_at": "2026-11-25T09:40"}
HTML = '<script>alert("x")</script><b>bold</b>'
"""Entered text that must be shown as text: on every page and in the document."""


def _no_markup_from_entries(page: Any, where: str) -> None:
    """Entered HTML and the HTML in a printed name became no element of the page."""
    # A document embeds its signed checkpoint as a JSON data block (templates/_checkpoint.html.j2), never run.
    assert page.locator(f"{where} script:not(#sopflow-checkpoint), {where} b, {where} i").count() == 0, where
    data = page.locator(f"{where} script#sopflow-checkpoint")
    assert all(data.nth(i).get_attribute("type") == "application/json" for i in range(data.count())), where


def _escaped(person: Person, path: str, *texts: str) -> None:
    """The page's bytes carry the entered HTML escaped, never as markup."""
    body = person.context.request.get(person.base + path).text()
    assert "<script>alert" not in body, path
    assert "<i>Role</i>" not in body, path
    for text in texts:
        assert text in body, path


def test_dose_receipts_through_the_pages(engine, web_url, browser, shots, capsys):
    from flows.services import runs as runs_service
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.training import grant_training

    qa = Officer("qa", PASSWORD)
    add_user(
        engine,
        "dual",
        "Dual <i>Role</i>",
        PASSWORD,
        [("demo_hospital", "cell_lab"), ("demo_hospital", "pharmacist")],
        officer=qa,
    )
    grant_training(engine, "dual", "demo_hospital", "dose_receipt", 1, trainer="Test Trainer", officer=qa)
    people = {name: Person(browser, web_url, name) for name in [*DEMO_STAFF, "dual"]}
    qm, tech, pharm, qa, doc, dual = (people[n] for n in ("qm", "tech", "pharm", "qa", "doc", "dual"))
    try:
        # Every demo role signs in; a wrong password is refused first.
        page = qm.login("not-the-password")
        assert "wrong user name or password" in page.inner_text("#login-error")
        for person in people.values():
            if person is not doc:
                assert person.login().url.endswith("/inbox"), person.username
        page = doc.go("/login")  # by keyboard alone: the focus starts in the user name
        # Chromium applies autofocus at a rendering update, which can come after "load" on a busy machine.
        page.wait_for_function("document.activeElement && document.activeElement.id === 'username'")
        page.keyboard.type("doc")
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url("**/inbox")
        assert "Nothing waits on you" in doc.page.inner_text("#inbox")

        # -- receipt A ----------------------------------------------------------------------------------
        run_a = _start_receipt(qm, "COI-WEB-0001", "LOT-W1")
        wait_for(engine, run_a, step="arrival")
        page = dual.open_step(run_a, "arrival")
        dual.fill({**ARRIVAL_FORM, "courier": HTML, "logger_max_c": "-250"})
        dual.review()
        assert "below the minimum -200 °C" in page.inner_text("#f-logger_max_c-err")
        dual.shot(shots, "en-step-form")
        assert page.locator("#sign-dialog").count() == 0
        dual.fill({"logger_max_c": "-171.5"})
        dual.review()
        dialog = page.inner_text("#sign-dialog")
        for shown in ("Received and inspected the shipper", "-171.5 °C", "Dual <i>Role</i>", HTML):
            assert shown in dialog
        _no_markup_from_entries(page, "#sign-dialog")
        assert "2026-11-25T01:40:00+00:00" in dialog  # exactly what is stored: the local time in UTC
        dual.shot(shots, "en-sign-dialog")
        dual.sign("wrong-password-1")
        assert "wrong user name or password" in page.inner_text("#sign-err")
        dual.sign()
        page.wait_for_url(f"**/runs/{run_a}")
        assert "Signed. Signature sha256" in page.inner_text("main")

        rec = wait_for(engine, run_a, step="identity_verification")
        page = dual.open_step(run_a, "identity_verification")
        assert "may not verify it" in page.inner_text("main")  # said before, refused when signing
        dual.fill({"coi_matches": "yes", "documents": "complete"})
        dual.review()
        dual.sign()
        assert "the person who performed 'arrival' may not verify it" in page.inner_text("#problems")
        rec = runs_service.quality_record(engine, run_a)
        assert next(s for s in rec["steps"] if s["id"] == "identity_verification")["status"] == "waiting"

        qa_inbox = qa.go("/inbox")  # open before anything waits on QA; it updates without a reload
        assert qa_inbox.locator(f"a[href='/runs/{run_a}/steps/qa_acceptance']").count() == 0
        page = pharm.open_step(run_a, "identity_verification")
        assert "-171.5 °C" in page.inner_text(".verifies")
        assert HTML in page.inner_text(".verifies")
        _no_markup_from_entries(page, ".verifies")
        pharm.fill({"coi_matches": "yes", "documents": "complete"})
        pharm.review()
        pharm.sign()
        page.wait_for_url(f"**/runs/{run_a}")

        qa_inbox.wait_for_selector(f"#inbox a[href='/runs/{run_a}/steps/qa_acceptance']")
        page = qa.page
        card = page.inner_text("#inbox")
        assert "QA acceptance into stock" in card
        assert " left" in card  # 4 h time-out: time left shown
        qa.shot(shots, "en-inbox")
        page = qa.open_step(run_a, "qa_acceptance")
        qa.fill({"decision": "approve", "reason": HTML})
        qa.review()
        assert "Accepted dose into stock" in page.inner_text("#sign-dialog")
        qa.sign()
        rec = wait_for(engine, run_a, statuses=("completed",))
        page = qm.go(f"/runs/{run_a}")
        main = page.inner_text("main")
        for shown in ("completed", "Dual <i>Role</i>", "Zhang Min", "Wang Fang", HTML):
            assert shown in main
        _no_markup_from_entries(page, "main")
        assert rec["documents"][0]["sha256"] in main
        assert page.locator(f"a[href$='/runs/flow-run/{rec['run']['flow_run_id']}']").count() == 1
        qm.shot(shots, "en-run-timeline")
        page.click(f"a[href='/documents/{rec['documents'][0]['id']}']")
        assert "the file matches it" in page.inner_text("main")
        page.click("text=View")
        assert "COI-WEB-0001" in page.content()
        _no_markup_from_entries(page, "body")
        escaped = "&lt;script&gt;alert("
        for path in (
            f"/runs/{run_a}",
            f"/documents/{rec['documents'][0]['id']}/view",
            f"/documents/{rec['documents'][0]['id']}/download",
        ):
            _escaped(qm, path, escaped, "&lt;i&gt;Role&lt;/i&gt;")
        _escaped(dual, "/inbox", "Dual &lt;i&gt;Role&lt;/i&gt;")

        # -- receipt B: the transit check fails and opens a deviation --------------------------------
        run_b = _start_receipt(qm, "COI-WEB-0002", "LOT-W2")
        wait_for(engine, run_b, step="arrival")
        tech.open_step(run_b, "arrival")
        tech.fill({**ARRIVAL_FORM, "logger_max_c": "-120"})
        tech.review()
        tech.sign()
        wait_for(engine, run_b, step="transit_temperature__disposition")
        page = qa.go("/inbox")
        page.click("header form[action='/language'] button")  # 中文
        page.wait_for_selector("html[lang=zh-CN]")
        assert "等待您处理" in page.inner_text("main")
        qa.shot(shots, "zh-inbox")
        page = qa.open_step(run_b, "transit_temperature__disposition")
        qa.fill({"decision": "reject", "reason": "Transit excursion to -120 °C; return to MAH"})
        qa.shot(shots, "zh-step-form")
        qa.review()
        assert "签署" in page.inner_text("#sign-dialog")
        qa.sign()
        page.wait_for_url(f"**/runs/{run_b}")
        wait_for(engine, run_b, statuses=("rejected",))
        page = qa.go(f"/runs/{run_b}")
        main = page.inner_text("main")
        for shown in ("偏差", "检查未通过", "已拒收"):  # deviation, check failed, rejected
            assert shown in main
        qa.shot(shots, "zh-run-timeline")
        qa.login()  # the language is the user's: it stays after signing in again
        assert qa.page.locator("html[lang=zh-CN]").count() == 1
    finally:
        for person in people.values():
            person.close()
    with capsys.disabled():
        print(f"\nweb screenshots: {shots}")
    assert {p.name for p in shots.glob("*.png")} >= {  # the folder may hold other browser tests' too
        "en-inbox.png",
        "en-run-timeline.png",
        "en-sign-dialog.png",
        "en-step-form.png",
        "zh-inbox.png",
        "zh-run-timeline.png",
        "zh-step-form.png",
    }
