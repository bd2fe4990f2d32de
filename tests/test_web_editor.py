"""SOP change control in the web app (issue 6, web side): the administrators' editor, an SOP's
versions with their states, the diff page. Over HTTP (FastAPI's TestClient) and in real headless
Chromium (the browser, launch arguments and screenshot folder of tests/test_web_browser.py).

The editor needs no Prefect: these tests serve the app over their own SQLite database with the
repository's demo institution established (``sopflow sop establish``) and three staff: an SOP
administrator, a cell-lab technician and QA (``tests.test_versions._staff``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from flows.record.db import read_session, write_session
from flows.record.tables import AuditEvent, SopVersion
from tests.conftest import PASSWORD, REPO
from tests.test_web_browser import ARGS, BROWSER_WAIT_MS, CHROMIUM, browser_fixture, serve, shots_fixture  # noqa: F401  (fixtures)

INST = "demo_hospital"
PROBE = """# Owner: test · Approval: none · Effective: when change control says
schema_version: 1
id: editor_probe
title: Editor probe
version: 1
params:
  lot: {type: text, label: Lot}
steps:
  - id: measure
    kind: record
    role: cell_lab
    meaning: Measured it
    fields:
      value: {type: number, min: 0, max: 100}
  - id: confirm
    kind: verify
    of: measure
    role: qa
    meaning: Verified the measurement
"""
ROLE_LINE = PROBE.splitlines().index("    role: qa") + 1
"""The line of the verify step's role, where the unknown role is typed (1-based, as the editor numbers)."""
DESKTOP = {"width": 1400, "height": 900}


@pytest.fixture(name="settings", scope="module")
def settings_fixture(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A database with the demo institution's SOPs Effective and ``editor_probe`` v1 as a Draft
    written by the administrator ``adm``."""
    from flows.services.drafts import create_draft
    from flows.services.guard import Officer
    from flows.services.versions import establish
    from tests.test_versions import _settings, _staff

    tmp = tmp_path_factory.mktemp("web-editor")
    settings = _settings(f"sqlite:///{tmp / 'sopflow.db'}", tmp)
    _staff(settings)
    establish(settings, INST, Officer("qa", PASSWORD))
    create_draft(settings, INST, PROBE, name="editor_probe.yaml", username="adm", password=PASSWORD)
    return settings


@pytest.fixture(name="app", scope="module")
def app_fixture(settings: Any) -> Any:
    from flows.web import create_app

    return create_app(settings)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "the page has no CSRF field"
    return m.group(1)


def login(app: Any, username: str) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    r = client.post(
        "/login",
        data={"csrf": csrf_of(client.get("/login").text), "username": username, "password": PASSWORD, "next": "/sops"},
    )
    assert r.status_code == 303, r.text
    return client


def written(settings: Any) -> tuple[int, int]:
    """(SOP version rows, the audit chain's head)."""
    with read_session(settings.database_url) as s:
        rows = s.exec(select(func.count()).select_from(SopVersion)).one()
        head = s.exec(select(func.max(AuditEvent.seq))).one()
    return rows, head


def audit_since(settings: Any, seq: int) -> list[str]:
    with read_session(settings.database_url) as s:
        return list(s.exec(select(AuditEvent.action).where(AuditEvent.seq > seq).order_by(col(AuditEvent.seq))))


def probe_versions(settings: Any) -> dict[int, str]:
    from flows.record.versions import versions_of

    with read_session(settings.database_url) as s:
        return {i.version.version: i.state for i in versions_of(s, INST, "editor_probe")}


# -- HTTP -------------------------------------------------------------------------------------------
def test_saving_without_csrf_or_as_non_administrator_writes_nothing(settings, app):
    adm, tech = login(app, "adm"), login(app, "tech")
    page = adm.get(f"/sops/{INST}/editor_probe/edit")
    assert page.status_code == 200
    text = PROBE.replace("\nversion: 1\n", "\nversion: 2\n")
    assert "version: 2" in page.text  # the editor opens on the newest version, numbered one above
    form = {"csrf": csrf_of(page.text), "text": text, "password": PASSWORD, "reason": "limit"}
    before = written(settings)
    for token in (None, "not-the-token", csrf_of(tech.get("/sops").text)):  # none, wrong, another session's
        data = {k: v for k, v in form.items() if k != "csrf"} | ({"csrf": token} if token else {})
        for path in (
            f"/sops/{INST}/editor_probe/edit",
            f"/sops/{INST}/editor_probe/edit/check",
            f"/sops/{INST}/new-sop",
        ):
            r = adm.post(path, data=data)
            assert r.status_code == 403, path
            assert "security token" in (r.json()["error"] if path.endswith("/check") else r.text)
    assert written(settings) == before  # not even a sign-in was audited

    # A non-administrator: the editor and its check are refused (403); a save is refused by the
    # service, which audits the refusal; no version is written.
    for path in (f"/sops/{INST}/editor_probe/edit", f"/sops/{INST}/new-sop"):
        r = tech.get(path)
        assert r.status_code == 403, path
        assert "may not edit SOPs at &#39;demo_hospital&#39;" in r.text
        assert "role &#39;sop_admin&#39;" in r.text
        assert 'id="sop-text"' not in r.text
    tech_csrf = csrf_of(tech.get("/sops").text)
    r = tech.post(f"/sops/{INST}/editor_probe/edit/check", data={"csrf": tech_csrf, "text": text})
    assert r.status_code == 403
    body = r.json()  # the editor's script reads JSON, refusals too
    assert (body["ok"], body["status"]) == (False, 403)
    assert "may not edit SOPs at 'demo_hospital'" in body["error"]
    assert body["errors"] == [body["error"]]
    r = tech.post(f"/sops/{INST}/editor_probe/edit", data={"csrf": tech_csrf, "text": text, "password": PASSWORD})
    assert r.status_code == 403
    assert "may not create SOP drafts at &#39;demo_hospital&#39;" in r.text
    assert written(settings)[0] == before[0]
    assert audit_since(settings, before[1]) == ["auth.ok", "sop.draft.refused"]
    assert "edit-sop" not in tech.get(f"/sops/{INST}/editor_probe").text  # no edit link for them
    assert probe_versions(settings) == {1: "draft"}

    # The administrator with a wrong password, and with an unknown role: nothing written either.
    r = adm.post(f"/sops/{INST}/editor_probe/edit", data={**form, "password": "wrong-password"})
    assert r.status_code == 401
    assert "wrong user name or password" in r.text
    assert "version: 2" in r.text  # the text is kept
    bad = text.replace("    role: qa\n", "    role: qa_officer\n")
    r = adm.post(f"/sops/{INST}/editor_probe/edit", data={**form, "text": bad})
    assert r.status_code == 422
    assert f'data-line="{ROLE_LINE}"' in r.text
    assert f"editor_probe.yaml:{ROLE_LINE}: steps[1].role: unknown role &#39;qa_officer&#39;" in r.text
    assert probe_versions(settings) == {1: "draft"}


def test_check_gives_the_cli_messages_at_their_line_and_the_schema_names(settings, app):
    from flows.sop.catalog import Catalog

    adm = login(app, "adm")
    csrf = csrf_of(adm.get(f"/sops/{INST}/editor_probe/edit").text)
    bad = PROBE.replace("\nversion: 1\n", "\nversion: 2\n").replace("    role: qa\n", "    role: qa_officer\n")
    r = adm.post(f"/sops/{INST}/editor_probe/edit/check", data={"csrf": csrf, "text": bad})
    assert r.status_code == 200
    assert r.json()["ok"] is True
    [problem] = r.json()["problems"]
    assert problem["line"] == ROLE_LINE
    # The same message `sopflow sop validate` prints for that file in the institution's folder.
    folder = Path(settings.database_url.removeprefix("sqlite:///")).parent / "sops" / INST
    shutil.copytree(REPO / "sops" / INST, folder, dirs_exist_ok=True)
    (folder / "editor_probe.yaml").write_text(bad, encoding="utf-8")
    [cli] = Catalog(folder.parent, REPO / "templates").validate(folder / "editor_probe.yaml")
    assert (cli.line, cli.path, cli.message) == (problem["line"], problem["path"], problem["message"])
    assert problem["text"] == f"editor_probe.yaml:{cli.line}: {cli.path}: {cli.message}"
    assert "expect" in r.json()["fields"]["step.check"]
    assert "of" in r.json()["fields"]["step.verify"]


def test_sop_page_shows_versions_states_and_links_and_the_diff_page_the_cli_lines(settings, app):
    from flows.record.versions import append_version_event
    from flows.services.transfer import diff_versions

    adm = login(app, "adm")
    page = adm.get(f"/sops/{INST}/editor_probe/edit").text
    v2 = (
        PROBE.replace("\nversion: 1\n", "\nversion: 2\n")
        .replace("max: 100", "max: 80")
        .replace("    role: qa\n", "    role: quality_manager\n")
    )
    r = adm.post(
        f"/sops/{INST}/editor_probe/edit",
        data={"csrf": csrf_of(page), "text": v2, "password": PASSWORD, "reason": "<b>tighter</b> limit"},
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/sops/{INST}/editor_probe"
    assert probe_versions(settings) == {1: "draft", 2: "draft"}
    with write_session(settings.database_url) as s:  # v1 under change control, as submit_change records it
        v1 = s.exec(select(SopVersion).where(SopVersion.sop_id == "editor_probe", SopVersion.version == 1)).one()
        append_version_event(
            s, v1, "in_review", actor="test", data={"run_id": "cc-run-1", "reviewer": "rev"}, reason="why"
        )
        sha1 = v1.sha256
    sop = adm.get(f"/sops/{INST}/editor_probe")
    assert sop.status_code == 200  # no file in sops/: the page shows the versions
    html = sop.text
    assert "Draft v2 of editor_probe saved" in html
    for shown in (
        '<tr id="v2">',
        '<span class="badge draft">',
        '<span class="badge in_review">',
        sha1,
        f'href="/sops/{INST}/editor_probe/diff?old=1&amp;new=2"',
        'href="/runs/cc-run-1"',
        "&lt;b&gt;tighter&lt;/b&gt; limit",
    ):
        assert shown in html, shown
    assert "<b>tighter" not in html

    r = adm.get(f"/sops/{INST}/editor_probe/diff?old=1&new=2")
    assert r.status_code == 200
    expected = [str(c) for c in diff_versions(settings, INST, "editor_probe", 1, 2)]
    assert len(expected) == 2
    shown = [
        re.sub(r"<[^>]+>", "", m).replace("&#39;", "'").replace("&gt;", ">")
        for m in re.findall(r'<span class="text">(.*?)</span>', r.text)
    ]
    assert shown == expected
    assert "step 'measure', field 'value', max: 100 → 80" in shown
    default = adm.get(f"/sops/{INST}/editor_probe/diff").text  # the newest two by default
    assert re.findall(r'<li class="change.*?</li>', default, re.S) == re.findall(
        r'<li class="change.*?</li>', r.text, re.S
    )
    zh = adm.get(f"/sops/{INST}/editor_probe/diff?old=1&new=2", headers={"Accept-Language": "zh-CN"})
    assert zh.status_code == 200
    bad = adm.get(f"/sops/{INST}/editor_probe/diff?old=1&new=9")
    assert bad.status_code == 404  # no such version: a NotFoundError, mapped by its class (issue 10)
    assert "has no version 9" in bad.text


def test_new_sop_starts_from_a_skeleton_saves_v1_and_the_text_is_shown_as_text(settings, app):
    adm = login(app, "adm")
    page = adm.get(f"/sops/{INST}/new-sop")
    assert page.status_code == 200
    assert "unknown role &#39;choose_a_role&#39;. Roles of demo_hospital:" in page.text  # said at once
    csrf = csrf_of(page.text)
    text = PROBE.replace("editor_probe", "web_new").replace(
        "title: Editor probe", 'title: "</textarea><script>x()</script>"'
    )
    r = adm.post(
        f"/sops/{INST}/new-sop",
        data={"csrf": csrf, "text": text.replace("cell_lab", "cell_labb"), "password": PASSWORD},
    )
    assert r.status_code == 422
    assert "<script>x()" not in r.text
    assert "&lt;/textarea&gt;&lt;script&gt;x()" in r.text  # kept in the editor, as text
    r = adm.post(f"/sops/{INST}/new-sop", data={"csrf": csrf, "text": text, "password": PASSWORD})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/sops/{INST}/web_new"
    sop = adm.get(r.headers["location"]).text
    assert "<script>x()" not in sop
    with read_session(settings.database_url) as s:
        saved = s.exec(select(SopVersion).where(SopVersion.sop_id == "web_new")).one()
    assert (saved.version, saved.text) == (1, text)
    assert f'<code class="sha">{saved.sha256}</code>' in sop
    zh = TestClient(app, follow_redirects=False, cookies=adm.cookies)
    zh.post("/language", data={"csrf": csrf, "language": "zh", "back": "/sops"})
    editor = zh.get(f"/sops/{INST}/web_new/edit").text
    for shown in ("保存为草稿", "此处可用的键名", "保存为 v2"):
        assert shown in editor
    zh.post("/language", data={"csrf": csrf, "language": "en", "back": "/sops"})


# -- the browser ------------------------------------------------------------------------------------
@pytest.fixture(name="web_url", scope="module")
def web_url_fixture(app: Any) -> Iterator[str]:
    yield from serve(app)


def _select_on_line(page: Any, line: int, word: str) -> None:
    """Put the selection on ``word`` in ``line`` of the editor (as a double-click would)."""
    page.evaluate(
        """([line, word]) => {
        const t = document.getElementById("sop-text");
        const lines = t.value.split("\\n");
        let start = 0;
        for (let i = 0; i < line - 1; i++) start += lines[i].length + 1;
        const at = start + lines[line - 1].indexOf(word);
        t.focus();
        t.setSelectionRange(at, at + word.length);
    }""",
        [line, word],
    )


@pytest.mark.slow
def test_browser_edits_a_draft_sees_the_problem_at_its_line_fixes_it_and_saves(settings, web_url, browser, shots):
    from flows.services.drafts import create_draft

    create_draft(
        settings,
        INST,
        PROBE.replace("editor_probe", "browser_probe"),
        name="browser_probe.yaml",
        username="adm",
        password=PASSWORD,
    )
    context = browser.new_context(viewport=DESKTOP, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(BROWSER_WAIT_MS)
    try:
        page.goto(web_url + "/login")
        page.fill("#username", "adm")
        page.fill("#password", PASSWORD)
        page.click("form[action='/login'] button.primary")
        page.goto(web_url + f"/sops/{INST}/browser_probe")
        page.click("#edit-sop")
        page.wait_for_url("**/browser_probe/edit")
        assert page.input_value("#sop-text").startswith("# Owner: test")
        first = page.input_value("#sop-text")
        number = int(re.search(r"^version: (\d+)$", first, re.M).group(1))
        assert page.locator("#gutter .ln").count() == len(first.split("\n"))  # the empty last line too
        assert page.locator("#gutter .ln.bad").count() == 0

        # The schema's key names for where the cursor is.
        _select_on_line(page, ROLE_LINE, "qa")
        page.keyboard.press("End")
        assert "a step of kind verify" in page.inner_text("#names-place")
        assert "of" in page.inner_text("#names-list").split()
        _select_on_line(page, 3, "id")
        page.keyboard.press("Home")
        assert "the top level of the SOP" in page.inner_text("#names-place")
        assert "steps" in page.inner_text("#names-list").split()
        _select_on_line(page, ROLE_LINE, "qa")  # a new key in the verify step: the names narrow as it is typed
        page.keyboard.press("End")
        page.keyboard.press("Enter")
        page.keyboard.type("    ti")
        assert page.inner_text("#names-list").split() == ["timeout", "timeout_deviation", "title"]
        page.click("#names-list button:text-is('title')")
        assert page.input_value("#sop-text").split("\n")[ROLE_LINE] == "    title: "
        page.fill("#sop-text", first)

        # Typing an unknown role: the message appears beside its line, marked in the gutter and listed.
        _select_on_line(page, ROLE_LINE, "qa")
        page.keyboard.type("qa_officer", delay=20)
        page.wait_for_selector(f"#gutter .ln.bad[data-line='{ROLE_LINE}']")
        page.wait_for_function(
            f"() => document.querySelector(\"#notes .note[data-line='{ROLE_LINE}']\")"
            ".textContent.includes(\"unknown role 'qa_officer'\")"
        )  # not a check of half the word
        note = page.inner_text(f"#notes .note[data-line='{ROLE_LINE}']")
        assert "steps[1].role: unknown role 'qa_officer'" in note
        assert page.locator("#gutter .ln.bad").count() == 1
        assert f"browser_probe.yaml:{ROLE_LINE}: steps[1].role: unknown role 'qa_officer'" in page.inner_text(
            "#problem-list"
        )
        assert "Problems: 1" in page.inner_text("#check-status")
        page.screenshot(path=str(shots / "en-sop-editor-problem.png"), full_page=True)
        page.click(f"#problem-list a[data-line='{ROLE_LINE}']")  # the list links to the line
        selected = page.evaluate(
            "() => { const t = document.getElementById('sop-text');"
            " return t.value.slice(t.selectionStart, t.selectionEnd); }"
        )
        assert selected == "    role: qa_officer"

        # Fixed: the marker and message go; saved as the next Draft.
        _select_on_line(page, ROLE_LINE, "qa_officer")
        page.keyboard.type("quality_manager", delay=10)
        page.wait_for_function(
            "() => document.querySelectorAll('#gutter .ln.bad').length === 0"
            " && document.getElementById('check-status').textContent.includes('No problems')"
        )
        page.fill("#draft-password", PASSWORD)
        page.click("#save-draft")
        page.wait_for_url(f"**/sops/{INST}/browser_probe")
        assert f"Draft v{number} of browser_probe saved" in page.inner_text("main")
        assert page.locator(f"#versions tr#v{number} .badge.draft").count() == 1
        with read_session(settings.database_url) as s:
            saved = s.exec(
                select(SopVersion).where(SopVersion.sop_id == "browser_probe", SopVersion.version == number)
            ).one()
        assert "    role: quality_manager\n" in saved.text
        assert saved.sha256 in page.inner_text("#versions")
        page.screenshot(path=str(shots / "en-sop-versions.png"), full_page=True)
        page.click(f"#versions tr#v{number} a.diff-link")
        page.wait_for_url("**/diff?*")
        assert "step 'confirm', role: 'qa' → 'quality_manager'" in page.inner_text("#changes")
        page.screenshot(path=str(shots / "en-sop-diff.png"), full_page=True)

        # A non-administrator is refused the editor.
        other = browser.new_context(viewport=DESKTOP, locale="en-US")
        tech = other.new_page()
        tech.goto(web_url + "/login")
        tech.fill("#username", "tech")
        tech.fill("#password", PASSWORD)
        tech.click("form[action='/login'] button.primary")
        response = tech.goto(web_url + f"/sops/{INST}/browser_probe/edit")
        assert response.status == 403
        assert "may not edit SOPs at 'demo_hospital'" in tech.inner_text("main")
        assert tech.locator("#sop-text").count() == 0
        other.close()
    finally:
        context.close()
    assert {"en-sop-editor-problem.png", "en-sop-versions.png", "en-sop-diff.png"} <= {
        p.name for p in shots.glob("*.png")
    }
