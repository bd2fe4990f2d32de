"""The integration API (issue 13) over HTTP, on the session's real database, Prefect server and
executor: its OpenAPI document is served; a token starts a run as its service account and reads
runs, records, an inbox and a chain of its institution; a token of another institution, an action
outside its scopes, a revoked or unknown token are refused, each audited; bad input is
``{error, field}`` with the right status and writes nothing; the rate limit answers 429; nothing
in it signs."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from flows.record.db import read_session
from flows.record.tables import AuditEvent, SopRun, User
from flows.services import accounts, tokens
from flows.services.guard import Officer
from tests.fixtures_engine import PARAMS, PASSWORD, start_receipt, wait_for
from tests.seed import seed_user

pytestmark = pytest.mark.slow

QA = Officer("qa", PASSWORD)
LANG_QA = Officer("est_lang_hospital", PASSWORD)


@pytest.fixture(name="api", scope="module")
def api_fixture(engine: Any) -> TestClient:
    from flows.web import create_app

    return TestClient(create_app(engine))


@pytest.fixture(name="accounts_", scope="module")
def accounts_fixture(engine: Any) -> dict[str, str]:
    """Service accounts: his.gateway (coordinator at demo_hospital: it may start receipts), and
    lab.gateway (quality_manager at lang_hospital)."""
    accounts.add_user(
        engine, "his.gateway", "HIS gateway (system)", PASSWORD, [("demo_hospital", "coordinator")], officer=QA
    )
    seed_user(engine, "lab.gateway", "Lab gateway (system)", PASSWORD, [("lang_hospital", "quality_manager")])
    return {"demo": "his.gateway", "lang": "lab.gateway"}


def _token(engine: Any, institution: str, account: str, *scopes: str, officer: Officer = QA) -> tuple[str, str]:
    return tokens.create_token(
        engine, f"test {institution} {'+'.join(scopes)}", institution, account, list(scopes), officer
    )


@pytest.fixture(name="his", scope="module")
def his_fixture(engine: Any, accounts_: dict[str, str]) -> str:
    _, secret = _token(
        engine,
        "demo_hospital",
        "his.gateway",
        "runs:read",
        "runs:start",
        "records:read",
        "inbox:read",
        "chain:read",
        "identifiers:validate",
    )
    return secret


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def head(engine: Any) -> int:
    with read_session(engine.database_url) as s:
        return int(s.exec(select(func.max(AuditEvent.seq))).one() or 0)


def events_since(engine: Any, seq: int) -> list[AuditEvent]:
    """What clients did since ``seq`` (``api.*``; the engine's own events are left out)."""
    with read_session(engine.database_url) as s:
        return list(
            s.exec(
                select(AuditEvent)
                .where(AuditEvent.seq > seq, col(AuditEvent.action).startswith("api."))
                .order_by(col(AuditEvent.seq))
            )
        )


def account_id(engine: Any, username: str) -> str:
    with read_session(engine.database_url) as s:
        return s.exec(select(User.id).where(User.username == username)).one()


def test_api_serves_its_openapi_document_and_offers_no_signing(api: TestClient):
    doc = api.get("/api/v1/openapi.json")
    assert doc.status_code == 200
    spec = doc.json()
    assert spec["servers"] == [{"url": "/api/v1"}]
    assert set(spec["paths"]) == {
        "/health",
        "/runs",
        "/runs/{run_id}",
        "/runs/{run_id}/record",
        "/users/{username}/inbox",
        "/chain/{coi}",
        "/identifiers/validate",
    }
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    posts = sorted(p for p, ops in spec["paths"].items() if "post" in ops)
    assert posts == ["/identifiers/validate", "/runs"]  # no signature, no submission, no resume
    assert "Error" in spec["components"]["schemas"]
    assert api.get("/api/v1/health").json() == {"ok": True}


def test_api_a_path_with_a_control_character_answers_json_not_a_web_page(api: TestClient):
    # Starlette's mount pattern does not match a newline, so such a path reaches the web app's handler
    # (found by the schemathesis run in test_api_fuzz): it must still answer as the API documents.
    for path in ("/api/v1/runs/%0Aabc", "/api/v1/runs/%0Be%0A/record", "/api/v1/users/%0A/inbox"):
        answer = api.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("application/json"), path
        assert answer.json()["error"] == "no such API path; see /api/v1/openapi.json"


def test_api_starts_a_run_as_its_service_account_and_reads_it(engine: Any, api: TestClient, his: str):
    seq = head(engine)
    r = api.post(
        "/api/v1/runs",
        json={"sop_id": "dose_receipt", "params": {**PARAMS, "coi": "COI-API-0001"}},
        headers=bearer(his),
    )
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    assert r.json()["sop_version"] == 1
    wait_for(engine, run_id, step="arrival")
    with read_session(engine.database_url) as s:
        assert s.get(SopRun, run_id).started_by == account_id(engine, "his.gateway")

    summary = api.get(f"/api/v1/runs/{run_id}", headers=bearer(his)).json()
    assert (summary["status"], summary["waiting_on"]) == ("waiting", ["arrival"])
    assert "params" not in summary  # runs:read carries no patient data
    assert run_id in {r["id"] for r in api.get("/api/v1/runs", headers=bearer(his)).json()}
    record = api.get(f"/api/v1/runs/{run_id}/record", headers=bearer(his)).json()
    assert record["run"]["params"]["patient_id"] == PARAMS["patient_id"]
    inbox = api.get("/api/v1/users/tech/inbox", headers=bearer(his)).json()
    assert any(i["run_id"] == run_id and i["step_id"] == "arrival" for i in inbox)
    chain = api.get("/api/v1/chain/COI-API-0001", headers=bearer(his)).json()
    assert [e["run_id"] for e in chain["runs"]] == [run_id]

    used = [(e.action, e.actor) for e in events_since(engine, seq)]
    me = account_id(engine, "his.gateway")
    assert used == [
        ("api.runs.start", me),
        ("api.runs.read", me),
        ("api.runs.list", me),
        ("api.records.read", me),
        ("api.inbox.read", me),
        ("api.chain.read", me),
    ]
    assert all(json.loads(e.payload_json)["token"] for e in events_since(engine, seq))


def test_api_token_of_another_institution_is_answered_not_found_and_audited(
    engine: Any, api: TestClient, accounts_: dict[str, str]
):
    run_id = start_receipt(engine, coi="COI-API-0002")
    _, lang = _token(
        engine, "lang_hospital", "lab.gateway", "runs:read", "records:read", "inbox:read", "chain:read", officer=LANG_QA
    )
    seq = head(engine)
    for path in (
        f"/api/v1/runs/{run_id}",
        f"/api/v1/runs/{run_id}/record",
        "/api/v1/users/tech/inbox",
        "/api/v1/chain/COI-API-0002",
    ):
        r = api.get(path, headers=bearer(lang))
        assert r.status_code == 404, path  # as if there were no such run, user or dose: nothing to probe
        assert r.json()["field"] is None
        assert r.json()["error"].startswith("no such ")
        assert PARAMS["patient_id"] not in r.text
    assert run_id not in {r["id"] for r in api.get("/api/v1/runs", headers=bearer(lang)).json()}
    refused = [(e.action, e.actor) for e in events_since(engine, seq) if e.action.endswith(".refused")]
    me = account_id(engine, "lab.gateway")
    assert refused == [
        ("api.runs.read.refused", me),
        ("api.records.read.refused", me),
        ("api.inbox.read.refused", me),
        ("api.chain.read.refused", me),
    ]


def test_api_action_outside_the_tokens_scopes_is_refused_and_audited(
    engine: Any, api: TestClient, accounts_: dict[str, str]
):
    _, reader = _token(engine, "demo_hospital", "his.gateway", "runs:read")
    with read_session(engine.database_url) as s:
        runs_before = s.exec(select(func.count()).select_from(SopRun)).one()
    seq = head(engine)
    r = api.post("/api/v1/runs", json={"sop_id": "dose_receipt", "params": PARAMS}, headers=bearer(reader))
    assert r.status_code == 403
    assert "that takes scope 'runs:start'" in r.json()["error"]
    r = api.get("/api/v1/runs/whatever/record", headers=bearer(reader))
    assert r.status_code == 403
    with read_session(engine.database_url) as s:
        assert s.exec(select(func.count()).select_from(SopRun)).one() == runs_before
    assert [e.action for e in events_since(engine, seq)] == ["api.runs.start.refused", "api.records.read.refused"]


def test_api_revoked_and_unknown_tokens_are_refused_and_audited(
    engine: Any, api: TestClient, accounts_: dict[str, str]
):
    token_id, secret = _token(engine, "demo_hospital", "his.gateway", "runs:read")
    assert api.get("/api/v1/runs", headers=bearer(secret)).status_code == 200
    tokens.revoke_token(engine, token_id, QA, "the HIS moved to a new host")
    seq = head(engine)

    r = api.get("/api/v1/runs", headers=bearer(secret))
    assert r.status_code == 401
    assert r.json() == {"error": f"token {token_id} (test demo_hospital runs:read) was revoked", "field": None}
    r = api.get("/api/v1/runs", headers=bearer("sopflow_not-a-token"))
    assert r.status_code == 401
    assert api.get("/api/v1/runs").status_code == 401  # no token at all: nothing to attribute, not audited
    events = events_since(engine, seq)
    assert [(e.action, e.actor, e.object_id) for e in events] == [
        ("api.runs.list.refused", "unauthenticated", token_id),
        ("api.runs.list.refused", "unauthenticated", tokens.token_key("sopflow_not-a-token")[:12]),
    ]
    listed = next(t for t in tokens.list_tokens(engine) if t["id"] == token_id)
    assert listed["revoked_reason"] == "the HIS moved to a new host"
    assert secret not in json.dumps(listed, default=str)


def test_api_bad_input_names_the_field_and_writes_nothing(engine: Any, api: TestClient, his: str):
    with read_session(engine.database_url) as s:
        runs_before = s.exec(select(func.count()).select_from(SopRun)).one()
    missing = {k: v for k, v in PARAMS.items() if k != "coi"}
    r = api.post("/api/v1/runs", json={"sop_id": "dose_receipt", "params": missing}, headers=bearer(his))
    assert r.status_code == 400
    assert r.json()["field"] == "params.coi"
    r = api.post("/api/v1/runs", json={"sop_id": "dose_receipt", "params": {**PARAMS, "cio": "x"}}, headers=bearer(his))
    assert (r.status_code, r.json()["field"]) == (400, "params.cio")
    assert "Did you mean 'coi'" in r.json()["error"]
    r = api.post("/api/v1/runs", json={"sop_id": "dose_reciept", "params": PARAMS}, headers=bearer(his))
    assert r.status_code == 404
    assert "Did you mean 'dose_receipt'" in r.json()["error"]
    r = api.post("/api/v1/runs", json={"params": PARAMS}, headers=bearer(his))
    assert r.status_code == 400
    assert r.json()["field"] == "sop_id"
    r = api.post("/api/v1/runs", content=b"{not json", headers={**bearer(his), "Content-Type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()) >= {"error", "field"}
    assert api.get("/api/v1/runs/no-such-run", headers=bearer(his)).status_code == 404
    with read_session(engine.database_url) as s:
        assert s.exec(select(func.count()).select_from(SopRun)).one() == runs_before


def test_api_validates_a_scanned_din_and_coi(engine: Any, api: TestClient, his: str, accounts_: dict[str, str]):
    from flows.sop.identifiers import din_check_character

    check = din_check_character("G123498654321")
    ok = api.post(
        "/api/v1/identifiers/validate", json={"kind": "din", "value": f"G1234 98 654321 {check}"}, headers=bearer(his)
    )
    assert ok.status_code == 200
    body = ok.json()
    assert body == {"valid": True, "value": f"G123498654321{check}", "error": None, "field": None}
    wrong = body["value"][:13] + ("A" if body["value"][13] != "A" else "B")
    bad = api.post("/api/v1/identifiers/validate", json={"kind": "din", "value": wrong}, headers=bearer(his)).json()
    assert bad["valid"] is False
    assert bad["field"] == "value"
    assert f"check character {wrong[13]!r} does not match DIN {wrong[:13]}" in bad["error"]
    # demo_hospital's products have no coi_pattern yet: the answer says so and names the key.
    r = api.post(
        "/api/v1/identifiers/validate",
        json={"kind": "coi", "value": "KT-2026-000117", "product": "tecartus"},
        headers=bearer(his),
    )
    assert r.json()["valid"] is False
    assert "has no 'coi_pattern'" in r.json()["error"]
    r = api.post("/api/v1/identifiers/validate", json={"kind": "coi", "value": "KT-1"}, headers=bearer(his))
    assert (r.status_code, r.json()["valid"], r.json()["field"]) == (200, False, "product")
    r = api.post("/api/v1/identifiers/validate", json={"kind": "isbn", "value": "x"}, headers=bearer(his))
    assert (r.status_code, r.json()["field"]) == (400, "kind")
    # lang_hospital's tecartus has one.
    _, lang = _token(engine, "lang_hospital", "lab.gateway", "identifiers:validate", officer=LANG_QA)
    good = api.post(
        "/api/v1/identifiers/validate",
        json={"kind": "coi", "value": "KT-2026-000117", "product": "tecartus"},
        headers=bearer(lang),
    ).json()
    assert good == {"valid": True, "value": "KT-2026-000117", "error": None, "field": None}
    r = api.post(
        "/api/v1/identifiers/validate",
        json={"kind": "coi", "value": "KT-2026-17", "product": "tecartus"},
        headers=bearer(lang),
    ).json()
    assert r["valid"] is False
    assert "e.g. 'KT-2026-000117'" in r["error"]
    r = api.post(
        "/api/v1/identifiers/validate",
        json={"kind": "coi", "value": "KT-1", "product": "tecartis"},
        headers=bearer(lang),
    )
    assert (r.status_code, r.json()["valid"], r.json()["field"]) == (200, False, "product")
    assert "Did you mean 'tecartus'" in r.json()["error"]


def test_api_rate_limit_answers_429_with_retry_after(engine: Any, accounts_: dict[str, str]):
    from flows.web import create_app

    slow = TestClient(create_app(replace(engine, api_rate_per_minute=3)))
    _, secret = _token(engine, "demo_hospital", "his.gateway", "runs:read")
    codes = [slow.get("/api/v1/health").status_code] + [
        slow.get("/api/v1/runs", headers=bearer(secret)).status_code for _ in range(4)
    ]
    assert codes == [200, 200, 200, 200, 429]
    r = slow.get("/api/v1/runs", headers=bearer(secret))
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert set(r.json()) == {"error", "field"}
    # Another token has its own allowance; unknown tokens share one per client address.
    _, other = _token(engine, "demo_hospital", "his.gateway", "runs:read")
    assert slow.get("/api/v1/runs", headers=bearer(other)).status_code == 200


def test_api_token_management_is_for_the_institutions_qa_officers(engine: Any, accounts_: dict[str, str]):
    from flows.errors import NotAuthorizedError, RecordError

    with pytest.raises(NotAuthorizedError, match="'demo_hospital'"):
        _token(engine, "demo_hospital", "his.gateway", "runs:read", officer=LANG_QA)
    with pytest.raises(RecordError, match="unknown scope 'runs:sign'"):
        _token(engine, "demo_hospital", "his.gateway", "runs:sign")
    with pytest.raises(RecordError, match="holds no role at 'demo_hospital'"):
        _token(engine, "demo_hospital", "lab.gateway", "runs:read")
    token_id, _ = _token(engine, "demo_hospital", "his.gateway", "runs:read")
    with pytest.raises(NotAuthorizedError):
        tokens.revoke_token(engine, token_id, LANG_QA, "not mine")
    tokens.revoke_token(engine, token_id, QA, "done")
    with pytest.raises(RecordError, match="revoked already"):
        tokens.revoke_token(engine, token_id, QA, "again")
