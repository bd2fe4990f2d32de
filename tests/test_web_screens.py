"""The screens of issue 14 in real headless Chromium at phone width (390 px), in English and
Chinese, against the session's real Prefect server and executor: the inbox card names the dose;
the step form says formats in words and what happens next; the signature dialog shows that it is
working while the server signs; a deviation is raised by hand on the phone; the deviation list and
page, the chain of identity, the dashboard with its charts, training, people, a correction and an
SOP's change-control actions. Every screen is photographed, in both languages, to
``$SOPFLOW_SCREENSHOTS`` or a temporary folder the test prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_engine import ARRIVAL, PASSWORD, sign, start_receipt, wait_for
from tests.test_web_browser import ARGS, CHROMIUM, Person, serve

pytestmark = pytest.mark.slow


@pytest.fixture(name="web_url", scope="module")
def web_url_fixture(engine: Any) -> Iterator[str]:
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
    import os

    folder = Path(os.environ.get("SOPFLOW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _switch(person: Person, language: str) -> None:
    page = person.page
    if page.locator(f"html[lang={'zh-CN' if language == 'zh' else 'en'}]").count():
        return
    page.click("header form[action='/language'] button")
    page.wait_for_selector(f"html[lang={'zh-CN' if language == 'zh' else 'en'}]")


def _fits_the_phone(person: Person, where: str) -> None:
    """Nothing wider than the phone: no sideways scrolling of the page itself."""
    width = person.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390 + 1, f"{where}: the page is {width} px wide on a 390 px phone"


def test_screens_for_people_in_both_languages(engine, web_url, browser, shots, capsys):
    run_id = start_receipt(engine, coi="COI-SCREEN-0001", lot="LOT-SCR-1")
    wait_for(engine, run_id, step="arrival")
    people = {n: Person(browser, web_url, n) for n in ("tech", "qa", "qm")}
    tech, qa, qm = people["tech"], people["qa"], people["qm"]
    try:
        for p in people.values():
            p.login()

        # -- the step form: dose, role label, formats in words, what happens next ------------------
        page = tech.open_step(run_id, "arrival")
        main = page.inner_text("main")
        for shown in (
            "COI-SCREEN-0001",
            "LOT-SCR-1",
            "Signed by: Cell-lab technician",
            "capital letters, digits",
            "After you sign",
        ):
            assert shown in main, shown
        assert "{3,30}" not in main
        _fits_the_phone(tech, "step form")
        tech.shot(shots, "en-step-form-words")
        tech.fill({**{k: v for k, v in ARRIVAL.items() if k != "arrived_at"}, "arrived_at": "2026-11-25T09:40"})
        tech.review()
        page.wait_for_selector("#sign-dialog")

        # -- signing shows that it is working: the first attempt's request is held off (aborted), so
        # -- the page stays and its busy line can be seen; then the signature goes through for real.
        page.route("**/steps/arrival/sign", lambda route: route.abort("aborted"))
        page.fill("#sign-password", PASSWORD)
        page.click("#sign-dialog button[value=sign]")
        page.wait_for_selector("#sign-busy", state="visible")
        assert page.locator("#sign-dialog button[value=sign]").get_attribute("aria-busy") == "true"
        assert page.locator("#sign-dialog button[value=edit]").is_disabled()
        tech.shot(shots, "en-signing-busy")
        page.unroute("**/steps/arrival/sign")
        page = tech.open_step(run_id, "arrival")
        tech.fill({**{k: v for k, v in ARRIVAL.items() if k != "arrived_at"}, "arrived_at": "2026-11-25T09:40"})
        tech.review()
        tech.sign()
        page.wait_for_url(f"**/runs/{run_id}")
        assert "What happens next: Second-person identity check" in page.inner_text("main")
        tech.shot(shots, "en-after-signing")

        # -- a deviation raised by hand on the phone ------------------------------------------------------
        page = tech.go(f"/deviations/new?run={run_id}")
        page.check("input[name=classification][value=minor]")
        page.fill("#dev-description", "Outer carton dented on arrival; shipper intact")
        page.fill("#dev-password", PASSWORD)
        _fits_the_phone(tech, "raise a deviation")
        tech.shot(shots, "en-deviation-raise")
        page.click("form[action='/deviations/new'] button.primary")
        page.wait_for_url("**/deviations/*")
        assert "Outer carton dented" in page.inner_text("h1")
        tech.shot(shots, "en-deviation")

        sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
        wait_for(engine, run_id, step="qa_acceptance")

        # -- the screens, in English then Chinese -------------------------------------------------------
        screens = [
            (qa, "/inbox", "inbox-dose", "#inbox"),
            (qa, "/deviations", "deviations", "#deviation-list"),
            (qm, "/chain?coi=COI-SCREEN-0001", "chain", "#chain-runs"),
            (qm, "/dashboard", "dashboard", "svg"),
            (qa, "/training", "training", "#mine"),
            (qa, "/people", "people", "table"),
            (tech, f"/runs/{run_id}/steps/arrival/correct", "correction", "#correct-reason"),
            (qm, f"/runs/{run_id}", "run", ".timeline"),
            (qa, "/sops/demo_hospital/dose_receipt", "sop-change-control", "#versions"),
        ]
        for language in ("en", "zh"):
            for person in people.values():
                person.go("/inbox")
                _switch(person, language)
            for person, path, name, selector in screens:
                page = person.go(path)
                page.wait_for_selector(selector)
                _fits_the_phone(person, f"{language} {path}")
                person.shot(shots, f"{language}-{name}")
            card = qa.go("/inbox").inner_text("#inbox")
            assert "COI-SCREEN-0001" in card
            assert ("质量管理员验收入库" if language == "zh" else "QA acceptance into stock") in card
            assert ("由质量管理员处理" if language == "zh" else "For QA officer") in card
        board = qm.go("/dashboard")
        assert board.locator("svg rect").count() >= 5
        assert "按产品环节统计的进行中运行" in board.inner_text("main")
    finally:
        for p in people.values():
            p.go("/inbox")
            _switch(p, "en")
            p.close()
    with capsys.disabled():
        print(f"\nscreens of issue 14: {shots}")
    names = {p.name for p in shots.glob("*.png")}
    for language in ("en", "zh"):
        for _, _, name, _ in screens:
            assert f"{language}-{name}.png" in names
