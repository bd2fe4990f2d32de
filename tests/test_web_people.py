"""The web for the people at the bench and the bedside (issue 14), over HTTP on the session's real
database, Prefect server and executor: the inbox and forms name the dose, the role's label, formats
and checks in words and what happens next; documents are named for people; deviations are raised by
hand (audited, refused where the guard says so, nothing written then); the chain, the dashboard,
training, people and change control have pages; every page reads wholly in Chinese for a Chinese
reader, apart from what the SOP files and the record themselves hold."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from flows.record.db import read_session
from flows.record.tables import AuditEvent, Deviation, SopRun, User
from tests.fixtures_engine import ARRIVAL, PASSWORD, sign, start_receipt, wait_for
from tests.test_web import audit_since, csrf_of, state
from tests.test_web import login as _login

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(name="app", scope="module")
def app_fixture(engine: Any) -> Any:
    from flows.web import create_app

    return create_app(engine)


@pytest.fixture(name="receipt", scope="module")
def receipt_fixture(engine: Any) -> str:
    """A receipt signed up to QA's acceptance (which waits, 4 h time-out)."""
    run_id = start_receipt(engine, coi="COI-PEOPLE-0001", lot="LOT-PPL-7")
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    sign(engine, run_id, "identity_verification", "pharm", {"coi_matches": "yes", "documents": "complete"})
    wait_for(engine, run_id, step="qa_acceptance")
    return run_id


def login(app: Any, username: str, password: str = PASSWORD) -> Any:
    """Signed in, pages in English (another test may have left the user's language at Chinese)."""
    client = _login(app, username, password)
    client.post("/language", data={"csrf": csrf_of(client.get("/inbox").text), "language": "en", "back": "/inbox"})
    return client


def text_of(html: str) -> str:
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def test_web_inbox_names_the_dose_the_role_and_when_it_is_due(engine, app, receipt):
    page = text_of(login(app, "qa").get("/inbox/items").text)
    card = page[page.index("QA acceptance into stock") :][:600]
    for shown in (
        "COI-PEOPLE-0001",
        "Brexucabtagene autoleucel (Tecartus)",
        "LOT-PPL-7",
        "H0001",
        "For QA officer",
        "Due ",
        "to be signed within 4 h",
    ):
        assert shown in card, shown
    assert "qa_acceptance" not in card  # the step by its title, the role by its label, not their ids


def test_web_step_form_says_formats_checks_and_what_happens_next_in_words(engine, app):
    run_id = start_receipt(engine, coi="COI-PEOPLE-0002")
    wait_for(engine, run_id, step="arrival")
    page = login(app, "tech").get(f"/runs/{run_id}/steps/arrival").text
    text = text_of(page)
    assert "^[A-Z0-9-]{3,30}$" not in text  # no regular expression
    assert "3 to 30 characters: capital letters, digits, the signs -; e.g. ABC-1234" in text
    assert "Signed by: Cell-lab technician" in text
    assert "The check “Transit temperature within the product's storage limit” runs" in text
    assert "Second-person identity check of cassette label against order and RFI waits on Pharmacist" in text
    assert 'data-busy="sign-busy"' not in page  # the busy line belongs to the signature dialog, shown with it
    for shown in ("COI-PEOPLE-0002", "Tecartus", "Patient ID"):
        assert shown in text


def test_web_run_page_labels_params_names_documents_and_says_checks(engine, app, receipt):
    from flows.services import signing

    signing.submit_step(engine, receipt, "qa_acceptance", "qa", PASSWORD, {"decision": "approve"})
    wait_for(engine, receipt, statuses=("completed",))
    text = text_of(login(app, "qm").get(f"/runs/{receipt}").text)
    for shown in ("Lot number LOT-PPL-7", "Hospital patient ID H0001", "Chain-of-identity ID COI-PEOPLE-0001"):
        assert shown in text, shown
    assert "Dose receipt and acceptance record (English, PDF)" in text
    assert "Dose receipt and acceptance record (English, HTML)" in text
    assert "“Logger maximum transit temperature” is at most the product's storage limit (-150)" in text
    assert "“Seal intact and number matches notice” is Yes" in text


def test_web_raising_a_deviation_by_hand_is_audited_and_starts_its_handling(engine, app, receipt):
    tech = login(app, "tech")
    csrf = csrf_of(tech.get(f"/deviations/new?run={receipt}").text)
    before = state(engine, receipt)
    form = {
        "csrf": csrf,
        "run": receipt,
        "classification": "major",
        "description": "Label smudged <b>x</b>",
        "password": PASSWORD,
    }
    refused = tech.post("/deviations/new", data={**form, "quarantine": "yes"})  # quarantine takes QA
    assert refused.status_code == 403
    assert "may not quarantine a dose at &#39;demo_hospital&#39;" in refused.text
    assert audit_since(engine, before[2], "tech") == ["auth.ok", "deviation.raise.refused"]
    missing = tech.post("/deviations/new", data={**form, "description": " "})
    assert missing.status_code == 422
    assert "describe the deviation" in missing.text
    assert tech.post("/deviations/new", data={**form, "csrf": "wrong"}).status_code == 403
    with read_session(engine.database_url) as s:
        assert (
            s.exec(select(Deviation).where(Deviation.run_id == receipt, Deviation.step_id == "raised_by_hand")).first()
            is None
        )

    r = tech.post("/deviations/new", data=form)
    assert r.status_code == 303
    page = tech.get(r.headers["location"]).text
    assert "Label smudged &lt;b&gt;x&lt;/b&gt;" in page
    with read_session(engine.database_url) as s:
        dev = s.exec(select(Deviation).where(Deviation.run_id == receipt, Deviation.step_id == "raised_by_hand")).one()
        opened = s.exec(
            select(AuditEvent).where(AuditEvent.action == "deviation.open", AuditEvent.object_id == dev.id)
        ).one()
        tech_id = s.exec(select(User.id).where(User.username == "tech")).one()
        handling = [
            r for r in s.exec(select(SopRun).where(SopRun.sop_id == "deviation_capa")) if dev.id in r.params_json
        ]
    assert opened.actor == tech_id
    assert dev.quarantine is False
    assert len(handling) == 1  # the institution's deviation SOP runs on it: dispositions and CAPA follow there
    listed = text_of(tech.get("/deviations").text)
    assert "Label smudged <b>x</b>" in listed
    assert "raised by hand" in listed


def test_web_chain_dashboard_and_training_pages(engine, app, receipt):
    qm = login(app, "qm")
    chain = text_of(qm.get("/chain?coi=COI-PEOPLE-0001").text)
    assert "CAR-T dose receipt and acceptance" in chain
    assert "no completed collection run for COI-PEOPLE-0001" in chain
    board = qm.get("/dashboard").text
    # Open runs by stage and deviations per month have bars; this dose was not infused, so it is not among
    # the receipt-to-infusion bars, which hold only doses other modules infused in this session's engine.
    before, section = board.split('id="receipt-to-infusion"')
    assert before.count("<svg") == 2
    assert 'aria-labelledby="stages-cap"' in before
    assert 'aria-labelledby="months-cap"' in before
    assert "PEOPLE-0001" not in section
    assert ("Nothing to show yet." in section) == ("<svg" not in section)
    assert "<rect" in board
    assert "<script" not in board.split("</head>")[1]
    text = text_of(board)
    for shown in (
        "Open runs by stage of the dose",
        "Doses in quarantine",
        "Deviations opened per month",
        "Days from receipt to infusion",
    ):
        assert shown in text
    mine = text_of(login(app, "tech").get("/training").text)
    assert "CAR-T dose receipt and acceptance dose_receipt v1" in mine
    assert "trained" in mine
    team = text_of(login(app, "qa").get("/training").text)
    assert "My team at demo_hospital" in team
    assert "Li Wei tech" in team


def test_web_people_page_is_for_qa_officers_and_adds_users_through_the_floor(engine, app):
    assert login(app, "tech").get("/people").status_code == 403
    qa = login(app, "qa")
    page = qa.get("/people").text
    assert "Zhang Min <code>pharm</code>" in page
    head = state(engine, "none")[2]
    r = qa.post(
        "/people/users",
        data={
            "csrf": csrf_of(page),
            "institution": "demo_hospital",
            "username": "web.nurse",
            "printed_name": "Web Nurse",
            "role.nurse": "nurse",
            "new_password": "first-pass-1",
            "password": PASSWORD,
        },
    )
    assert r.status_code == 303
    assert "Web Nurse <code>web.nurse</code>" in qa.get("/people").text
    assert "user.create" in audit_since(engine, head, "qa")
    wrong = qa.post(
        "/people/users",
        data={
            "csrf": csrf_of(page),
            "institution": "demo_hospital",
            "username": "web.other",
            "printed_name": "X",
            "role.nurse": "nurse",
            "new_password": "first-pass-1",
            "password": "not-it",
        },
    )
    assert "wrong user name or password" in qa.get(wrong.headers["location"]).text


def test_web_correction_needs_a_reason_and_keeps_the_earlier_entry(engine, app):
    run_id = start_receipt(engine, coi="COI-PEOPLE-0003")
    sign(engine, run_id, "arrival", "tech", ARRIVAL)
    wait_for(engine, run_id, step="identity_verification")
    tech = login(app, "tech")
    page = tech.get(f"/runs/{run_id}/steps/arrival/correct").text
    assert 'value="-171.5"' in page
    values = {f"f.{k}": v for k, v in {**ARRIVAL, "arrived_at": "2026-11-25T09:40", "logger_max_c": "-170.5"}.items()}
    no_reason = tech.post(
        f"/runs/{run_id}/steps/arrival/correct", data={"csrf": csrf_of(page), **values, "password": PASSWORD}
    )
    assert no_reason.status_code == 422
    assert "a correction needs a reason" in no_reason.text
    r = tech.post(
        f"/runs/{run_id}/steps/arrival/correct",
        data={"csrf": csrf_of(page), **values, "reason": "read the wrong logger channel", "password": PASSWORD},
    )
    assert r.status_code == 303
    from flows.services.runs import quality_record

    arrival = next(s for s in quality_record(engine, run_id)["steps"] if s["id"] == "arrival")
    assert arrival["data"]["logger_max_c"] == -170.5
    assert arrival["corrections"][0]["reason"] == "read the wrong logger channel"


def test_web_change_control_submit_starts_the_run_and_names_it(engine, app, tmp_path):
    from flows.services.accounts import add_user
    from flows.services.drafts import create_draft
    from flows.services.editor import sop_versions
    from flows.services.guard import Officer
    from flows.services.training import grant_training

    qa = Officer("qa", PASSWORD)
    add_user(engine, "web.adm", "Web Admin", PASSWORD, [("demo_hospital", "sop_admin")], officer=qa)
    add_user(engine, "web.rev", "Web Reviewer", PASSWORD, [("demo_hospital", "sop_reviewer")], officer=qa)
    for user in ("web.adm", "web.rev"):
        grant_training(engine, user, "demo_hospital", "change_control", 1, officer=qa)
    text = (
        (REPO / "tests" / "test_change_submit.py")
        .read_text(encoding="utf-8")
        .split('TEXT = """', 1)[1]
        .split('"""', 1)[0]
    )
    text = text.replace("cc_untrained", "cc_web").replace("version: 2", "version: 1")
    create_draft(engine, "demo_hospital", text, name="cc_web.yaml", username="web.adm", password=PASSWORD)
    adm = login(app, "web.adm")
    page = adm.get("/sops/demo_hospital/cc_web").text
    assert "Submit v1 to change control" in page
    assert '<option value="web.rev">' in page
    r = adm.post(
        "/sops/demo_hospital/cc_web/submit",
        data={"csrf": csrf_of(page), "version": "1", "reviewer": "web.rev", "reason": "new", "password": PASSWORD},
    )
    assert r.status_code == 303
    assert r.headers["location"].startswith("/runs/")
    assert {v["version"]: v["state"] for v in sop_versions(engine, "demo_hospital", "cc_web")} == {1: "in_review"}


ZH_PAGES = [
    "/inbox",
    "/runs",
    "/deviations",
    "/deviations/new",
    "/chain?coi=COI-PEOPLE-0001",
    "/dashboard",
    "/training",
    "/people",
    "/sops",
]


def _data_words(engine: Any) -> set[str]:
    """Words the SOP files, the catalogue and the record hold: shown as written, they are no page string."""
    words: set[str] = set()
    for path in (REPO / "sops").rglob("*.yaml"):
        words |= set(re.findall(r"[A-Za-z][A-Za-z0-9_]*", path.read_text(encoding="utf-8")))
    words |= set(
        re.findall(
            r"[A-Za-z][A-Za-z0-9_]*", (REPO / "flows" / "builtin" / "change_control.yaml").read_text(encoding="utf-8")
        )
    )
    with read_session(engine.database_url) as s:
        for row in s.exec(select(AuditEvent.payload_json).order_by(col(AuditEvent.seq))):
            words |= set(re.findall(r"[A-Za-z][A-Za-z0-9_]*", row))
    return words | {
        "sopflow",
        "sha256",
        "English",
        "UTC",
        "CST",
        "SOP",
        "PDF",
        "HTML",
        "Prefect",
        "v1",
        "v2",
        "h",
        "min",
        "d",
    }


def test_web_pages_in_chinese_leave_no_program_text_in_english(engine, app, receipt):
    allowed = _data_words(engine)
    client = login(app, "qa")
    client.post("/language", data={"csrf": csrf_of(client.get("/inbox").text), "language": "zh", "back": "/inbox"})
    run_pages = [f"/runs/{receipt}", f"/runs/{receipt}/steps/qa_acceptance"]
    found = {}
    try:
        for path in [*ZH_PAGES, *run_pages]:
            r = client.get(path)
            assert r.status_code == 200, path
            body = r.text.split("<main", 1)[1].split(">", 1)[1]
            left = {w for w in re.findall(r"\b[A-Za-z][A-Za-z0-9_]*", text_of(body)) if w not in allowed}
            if left:
                found[path] = sorted(left)
    finally:
        client.post("/language", data={"csrf": csrf_of(client.get("/inbox").text), "language": "en", "back": "/inbox"})
    assert not found, f"English on Chinese pages: {found}"
