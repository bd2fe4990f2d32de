"""The web app over HTTP (FastAPI's TestClient on the session's real database, Prefect server and
executor): CSRF and role refusals change nothing, a signature covers only the values shown,
sessions end at logout and after the idle timeout, lockout applies, the language is the user's,
and every page string has a Chinese translation. (Escaping of entered HTML on every page and in
documents: tests/test_web_browser.py.)"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from flows.record.db import read_session
from flows.record.tables import AuditEvent, Signature, StepRecord, User, UserEvent
from tests.fixtures_engine import ARRIVAL, PASSWORD, start_receipt, wait_for

pytestmark = pytest.mark.slow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="clock", scope="module")
def clock_fixture() -> Clock:
    return Clock()


@pytest.fixture(name="app", scope="module")
def app_fixture(engine: Any, clock: Clock) -> Any:
    from flows.web import create_app
    from flows.web.sessions import SessionStore

    return create_app(engine, SessionStore(15 * 60, clock=clock))


@pytest.fixture(name="waiting", scope="module")
def waiting_fixture(engine: Any) -> str:
    """A receipt waiting on its arrival. The tests below refuse to sign it, and change nothing;
    the CSRF test, last, signs it with its token as the control."""
    run_id = start_receipt(engine, coi="COI-WEBHTTP-0001")
    wait_for(engine, run_id, step="arrival")
    return run_id


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "the page has no CSRF field"
    return m.group(1)


def login(app: Any, username: str, password: str = PASSWORD, **kw: Any) -> TestClient:
    client = TestClient(app, follow_redirects=False, **kw)
    page = client.get("/login")
    r = client.post(
        "/login", data={"csrf": csrf_of(page.text), "username": username, "password": password, "next": "/inbox"}
    )
    assert r.status_code == 303, r.text
    return client


def state(engine: Any, run_id: str) -> tuple[int, int, int]:
    """(step records, signatures) of the run, and the audit chain's head."""
    with read_session(engine.database_url) as s:
        recs = s.exec(select(func.count()).select_from(StepRecord).where(StepRecord.run_id == run_id)).one()
        sigs = s.exec(select(func.count()).select_from(Signature).where(Signature.run_id == run_id)).one()
        head = s.exec(select(func.max(AuditEvent.seq))).one()
    return recs, sigs, head


def audit_since(engine: Any, seq: int, username: str) -> list[str]:
    """What ``username`` did since ``seq``, by the events' actor (the user's id). Runs of other tests
    on the shared server go on writing meanwhile, the engine's and their signers' (a fresh-clone CI
    saw another test's ``step.done`` land between two sign-ins)."""
    with read_session(engine.database_url) as s:
        user = s.exec(select(User).where(User.username == username)).one()
        return list(
            s.exec(
                select(AuditEvent.action)
                .where(AuditEvent.seq > seq, AuditEvent.actor == user.id)
                .order_by(col(AuditEvent.seq))
            )
        )


def arrival_form(csrf: str, **values: str) -> dict[str, str]:
    data = {"csrf": csrf, **{f"f.{k}": v for k, v in {**ARRIVAL, **values}.items()}}
    return {k: v for k, v in data.items() if v is not None}


def review(client: TestClient, run_id: str, step: str, form: dict[str, str]) -> tuple[str, str]:
    """Post the form for review; returns (the page, the sha256 of the values shown for signing)."""
    r = client.post(f"/runs/{run_id}/steps/{step}/review", data=form)
    assert r.status_code == 200, r.text
    return r.text, re.search(r'name="shown" value="([0-9a-f]{64})"', r.text).group(1)


def test_web_signer_without_the_steps_role_changes_nothing(engine, app, waiting):
    run_id = waiting
    pharm = login(app, "pharm")
    page = pharm.get(f"/runs/{run_id}/steps/arrival").text
    assert "may only be signed by role &#39;cell_lab&#39;" in page  # said on the form already
    csrf = csrf_of(page)
    _, shown = review(pharm, run_id, "arrival", arrival_form(csrf))
    before = state(engine, run_id)
    r = pharm.post(
        f"/runs/{run_id}/steps/arrival/sign",
        data={**arrival_form(csrf), "shown": shown, "password": PASSWORD, "action": "sign"},
    )
    assert r.status_code == 403
    assert "may only be signed by role &#39;cell_lab&#39;" in r.text
    recs, sigs, _ = state(engine, run_id)
    assert (recs, sigs) == before[:2]
    # The refusal is audited, nothing else.
    assert audit_since(engine, before[2], "pharm") == ["auth.ok", "sign.refused"]


def test_web_user_without_a_role_at_the_institution_sees_none_of_its_runs(engine, app, waiting):
    from tests.seed import seed_user

    seed_user(
        engine, "outsider", "Out Sider", PASSWORD, []
    )  # an account with no role: only seeded, the floor refuses it
    outsider = login(app, "outsider")
    assert waiting[:8] not in outsider.get("/runs").text
    for path in (f"/runs/{waiting}", f"/runs/{waiting}/steps/arrival"):
        r = outsider.get(path)
        assert r.status_code == 404, path  # as if there were no such run (tests/test_web_safety.py)
        assert "no such run among the runs you may read" in r.text
        assert "demo_hospital" not in r.text
        assert "COI-WEBHTTP-0001" not in r.text


def test_web_refuses_to_sign_values_other_than_the_ones_shown(engine, app, waiting):
    run_id = waiting
    tech = login(app, "tech")
    csrf = csrf_of(tech.get(f"/runs/{run_id}/steps/arrival").text)
    _, shown = review(tech, run_id, "arrival", arrival_form(csrf))
    before = state(engine, run_id)
    r = tech.post(
        f"/runs/{run_id}/steps/arrival/sign",
        data={**arrival_form(csrf, logger_max_c="-160"), "shown": shown, "password": PASSWORD, "action": "sign"},
    )
    assert r.status_code == 422
    assert "differ from the ones you reviewed" in r.text
    assert state(engine, run_id) == before


def test_web_post_without_or_with_a_wrong_csrf_token_changes_nothing(engine, app, waiting):
    run_id = waiting
    tech = login(app, "tech")
    csrf = csrf_of(tech.get(f"/runs/{run_id}/steps/arrival").text)
    _, shown = review(tech, run_id, "arrival", arrival_form(csrf))
    signing = {**arrival_form(csrf), "shown": shown, "password": PASSWORD, "action": "sign"}
    before = state(engine, run_id)
    for token in (None, "not-the-token", csrf_of(TestClient(app).get("/login").text)):  # none, wrong, another session's
        data = {k: v for k, v in signing.items() if k != "csrf"} | ({"csrf": token} if token else {})
        r = tech.post(f"/runs/{run_id}/steps/arrival/sign", data=data)
        assert r.status_code == 403
        assert "security token" in r.text
        assert state(engine, run_id) == before
    anonymous = TestClient(app, follow_redirects=False)
    anonymous.get("/login")
    r = anonymous.post("/login", data={"username": "tech", "password": PASSWORD})
    assert r.status_code == 403
    assert state(engine, run_id) == before  # not even a sign-in was audited
    r = tech.post(f"/runs/{run_id}/steps/arrival/sign", data=signing)  # the same form with its token goes through
    assert r.status_code == 303
    assert state(engine, run_id)[1] == before[1] + 1


def test_web_sessions_end_at_logout_and_after_the_idle_timeout(engine, app, clock):
    client = login(app, "doc")
    cookie = client.cookies.get("sopflow_session")
    r = client.get("/inbox")
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie
    assert "samesite=strict" in set_cookie
    with read_session(engine.database_url) as s:
        head = s.exec(select(func.max(AuditEvent.seq))).one()
    clock.now += 15 * 60 + 1
    r = client.get("/inbox")
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login")
    assert "without activity" in client.get(r.headers["location"]).text
    assert audit_since(engine, head, "doc") == ["auth.idle"]

    client = login(app, "doc")
    csrf = csrf_of(client.get("/inbox").text)
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert client.get("/inbox").status_code == 303
    stale = TestClient(app, follow_redirects=False, cookies={"sopflow_session": cookie})
    assert stale.get("/inbox").status_code == 303
    assert audit_since(engine, head, "doc") == ["auth.idle", "auth.ok", "auth.logout"]


def test_web_session_cookie_is_secure_over_https(engine, app):
    client = TestClient(app, base_url="https://testserver", follow_redirects=False)
    assert "secure" in client.get("/login").headers["set-cookie"].lower()


def test_web_failed_sign_ins_make_the_client_wait_and_lock_nothing(engine, app):
    from flows.record.accounts import is_locked
    from flows.services.accounts import add_user
    from flows.services.guard import Officer

    add_user(engine, "locky", "Lock Y", PASSWORD, [("demo_hospital", "nurse")], officer=Officer("qa", PASSWORD))
    client = TestClient(app, follow_redirects=False)
    for _ in range(engine.lockout_threshold):
        r = client.post(
            "/login",
            data={"csrf": csrf_of(client.get("/login").text), "username": "locky", "password": "wrong-password"},
        )
        assert r.status_code == 401
        assert "wrong user name or password, or the account may not sign in now" in r.text
    r = client.post(
        "/login", data={"csrf": csrf_of(client.get("/login").text), "username": "locky", "password": PASSWORD}
    )
    assert r.status_code == 429  # this client waits, even with the right password
    assert int(r.headers["retry-after"]) > 0
    assert "too many failed sign-ins from this address" in r.text
    with read_session(engine.database_url) as s:
        user = s.exec(select(User).where(User.username == "locky")).one()
        assert not is_locked(s, user.id)  # the account is not locked: its owner signs in elsewhere


def test_web_language_is_the_users_and_stays(engine, app):
    client = login(app, "doc")
    csrf = csrf_of(client.get("/inbox").text)
    assert client.post("/language", data={"csrf": csrf, "language": "zh", "back": "/inbox"}).status_code == 303
    page = client.get("/inbox").text
    assert '<html lang="zh-CN">' in page
    assert "等待您处理" in page
    again = login(app, "doc")  # another browser: the preference is the user's
    assert "等待您处理" in again.get("/inbox").text
    with read_session(engine.database_url) as s:
        kinds = list(s.exec(select(UserEvent.kind).join(User).where(User.username == "doc")))
    assert kinds == ["language"]
    client.post("/language", data={"csrf": csrf, "language": "en", "back": "/inbox"})


def test_web_errors_are_pages_without_tracebacks(engine, app):
    client = login(app, "qm")
    for path, status in (
        ("/runs/no-such-run", 404),
        ("/documents/no-such-doc", 404),
        ("/nowhere", 404),
        ("/runs/no-such-run/steps/arrival", 404),
        ("/sops/demo_hospital/no_such_sop", 404),
    ):
        r = client.get(path)
        assert r.status_code == status, path
        assert "Traceback" not in r.text
        assert "This could not be done" in r.text


def test_web_sop_pages_show_version_state_sha256_and_the_definition(engine, app):
    from flows.record.ledger import sha256_hex
    from flows.services.library import sop_library
    from tests.conftest import DEMO_SOP

    client = login(app, "qm")
    page = client.get("/sops").text
    rows = [r for inst in sop_library(engine) if inst["id"] == "demo_hospital" for r in inst["sops"]]
    receipt = next(r for r in rows if r["id"] == "dose_receipt" and r["file"])
    assert receipt["sha256"] == sha256_hex(DEMO_SOP.read_bytes())
    for r in rows:
        assert f'<code class="sha">{r["sha256"]}</code>' in page
        assert f'<span class="badge {r["state"]}">' in page
    sop = client.get("/sops/demo_hospital/dose_receipt").text
    for shown in (
        "arrival.logger_max_c &lt;= product.storage_max_c",
        "Logger maximum transit temperature",
        "from -200 to 40 °C",
        "Pharmacist",
        "distinct_signers",
        "tecartus",
    ):
        assert shown in sop
    assert 'id="not-in-force"' not in sop  # established: the page shows the Effective version


def test_web_sop_page_says_when_no_version_is_in_force(tmp_path):
    """An SOP whose file no version was made from (no change control yet) is shown with a warning."""
    import dataclasses

    from flows.config import get_settings
    from flows.record.ledger import sha256_hex
    from flows.services.library import describe_sop
    from tests.conftest import DEMO_SOP

    settings = dataclasses.replace(get_settings(), database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    desc = describe_sop(settings, "demo_hospital", "dose_receipt")
    assert desc["in_force"] is False
    assert desc["sha256"] == sha256_hex(DEMO_SOP.read_bytes())


@pytest.mark.parametrize("language", ["en", "zh"])
def test_web_sop_words_are_escaped_even_where_translated(language):
    """Labels, choices and states come from SOP files and the record: text, never markup."""
    from flows.web.base import _environment

    env = _environment(language)
    spec = {
        "name": "x",
        "type": "choice",
        "label": "<b>Label</b>",
        "choices": ["<i>c</i>", "approve"],
        "required": True,
    }
    html = env.from_string(
        '{% from "macros.html" import field %}{{ field(f, "", ["<s>bad</s>"], "f.", "UTC") }}{{ state|t }}'
    ).render(f=spec, state="<u>waiting</u>")
    for markup in ("<b>", "<i>", "<s>", "<u>"):
        assert markup not in html
    for text in ("&lt;b&gt;Label", "&lt;i&gt;c", "&lt;s&gt;bad", "&lt;u&gt;waiting"):
        assert text in html
    assert ("批准" if language == "zh" else "approve") in html  # a known word is still translated


def test_web_every_page_string_has_a_chinese_translation():
    from flows.web.base import _environment
    from flows.web.i18n import extract_messages, missing_translations

    env = _environment("en")
    assert len(extract_messages(env)) > 100
    assert missing_translations(env, "zh") == {}


NOT_WORDS = {"sopflow", "sha256", "English", "中文"}
"""Text in templates that is not a sentence to translate: the product's name, a hash's name, the
language switch (each language's name in itself)."""


def test_web_templates_hard_code_no_text():
    """Every word a page shows comes through the catalogue (``_``), never as template text."""
    from jinja2 import Environment

    from flows.web.i18n import TEMPLATES

    env = Environment(extensions=["jinja2.ext.i18n"], autoescape=True)
    found = []
    for path in sorted(TEMPLATES.glob("*.html")):
        # The template's own text with every Jinja construct replaced by a marker, then without tags.
        parts = []
        for _lineno, kind, value in env.lex(path.read_text(encoding="utf-8")):
            parts.append(value if kind == "data" else "\x00")
        source = "".join(parts)
        attrs = re.findall(r'(?:aria-label|title|placeholder|alt)="([^"]*)"', source)
        text = re.sub(r"<[^>]*>", " ", source)
        text = re.sub(r"\{#.*?#\}", " ", text, flags=re.S)
        for word in re.findall(r"[A-Za-z][A-Za-z0-9']+|[\u4e00-\u9fff]+", " ".join([text, *attrs])):
            if word not in NOT_WORDS:
                found.append(f"{path.name}: {word}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_inbox_cards_show_times_left_in_the_words_of_the_raw_seconds(language):
    """A card's time left is kept in the whole minutes it is shown in (``views.shown_seconds``), so
    that equal cards can be rendered once; the words and the overdue mark are those of the exact
    seconds: every second of two hours either side of due, fractions of a second around it, and
    times up to 30 days (checked: with the sign of a step overdue by less than a minute dropped, this fails at -59 s)."""
    import random

    from flows.services.views import shown_seconds
    from flows.web.base import _environment

    time_left = _environment(language).get_template("macros.html").module.time_left
    rnd = random.Random(11)  # noqa: S311 (times to try, not a secret)
    cases = [float(s) for s in range(-7200, 7201)] + [-0.999, -0.5, -0.001, 0.001, 0.5, 59.999, -59.999, -60.0]
    cases += [rnd.uniform(-30 * 86400, 30 * 86400) for _ in range(3000)]
    for s in cases:
        shown = shown_seconds(s)
        assert (shown < 0) == (s < 0), s
        assert str(time_left(shown)) == str(time_left(s)), s
    assert shown_seconds(None) is None


def test_web_inbox_list_is_rendered_once_while_its_cards_are_the_same(engine, app):
    """The inbox's list (asked for every 5 s by every open inbox) is kept by its exact inputs: asked
    again with nothing changed, it is the same HTML and nothing new is rendered; it is what the full
    items would render (the cards carry everything the list shows); a step that starts waiting
    changes it at once."""
    from flows.services.views import inbox_view
    from flows.web.app import INBOX_PAGE

    web = app.state.web
    wait_for(engine, start_receipt(engine, coi="COI-WEBHTTP-0098"), step="arrival")
    tech = login(app, "tech")
    first = tech.get("/inbox/items")
    assert first.status_code == 200
    assert 'class="card' in first.text
    kept = dict(web._fragments)
    again = tech.get("/inbox/items")
    assert again.text == first.text
    assert dict(web._fragments) == kept  # nothing rendered anew
    assert first.text in tech.get("/inbox").text  # the page shows the same list

    items, total = inbox_view(engine, "tech", "en", first=0, limit=INBOX_PAGE)
    full = (
        web.envs["en"]
        .get_template("_inbox_items.html")
        .render(items=items, total=total, page=1, first=1, last=len(items), pages=max(1, -(-total // INBOX_PAGE)))
    )
    assert full == first.text

    run_id = start_receipt(engine, coi="COI-WEBHTTP-0099")
    wait_for(engine, run_id, step="arrival")
    changed = tech.get("/inbox/items").text
    assert changed != first.text  # a card more, or one more counted in "1-20 of N"


def test_web_kept_lists_are_keyed_by_every_translation():
    """An SOP's text in several languages equals, as a ``str``, its first translation alone: two
    deadlines named alike in English but not in Chinese must not share a kept list (review of
    ``Web.fragment``); nor may values that print apart (1 / 1.0 / True, 0.0 / -0.0, list / tuple)."""
    from flows.sop.text import Localized
    from flows.web.base import _frozen

    a = Localized({"en": "Thaw to infusion", "zh": "解冻至输注"})
    b = Localized({"en": "Thaw to infusion", "zh": "解冻到回输"})
    assert a == b  # as str: the first translation
    assert _frozen({"clocks": [{"title": a}]}) != _frozen({"clocks": [{"title": b}]})
    assert _frozen({"clocks": [{"title": a}]}) == _frozen({"clocks": [{"title": Localized(dict(a.translations))}]})
    keys = [_frozen(v) for v in (1, 1.0, True, 0.0, -0.0, [1], (1,))]
    assert len(set(keys)) == len(keys)
