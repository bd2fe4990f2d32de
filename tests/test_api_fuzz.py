"""The integration API against its own OpenAPI document (issue 13): schemathesis generates requests
for every route from the schema, valid and invalid, and checks that none is a server error and that
every answer (status, content type, body) is one the document describes. The token reads and
validates; it may not start runs, so the fuzzing starts none (POST /runs answers 403, described)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from flows.services import tokens
from flows.services.guard import Officer
from tests.fixtures_engine import PASSWORD

pytestmark = pytest.mark.slow


@pytest.fixture(name="api_schema", scope="module")
def api_schema_fixture(engine: Any) -> Any:
    from flows.web import create_app

    app = create_app(replace(engine, api_rate_per_minute=1_000_000))
    return schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)


@pytest.fixture(name="fuzz_token", scope="module")
def fuzz_token_fixture(engine: Any) -> str:
    from flows.services import accounts

    qa = Officer("qa", PASSWORD)
    accounts.add_user(engine, "fuzz.gateway", "Fuzz gateway", PASSWORD, [("demo_hospital", "coordinator")], officer=qa)
    scopes = ["runs:read", "records:read", "inbox:read", "chain:read", "identifiers:validate"]
    return tokens.create_token(engine, "schemathesis", "demo_hospital", "fuzz.gateway", scopes, qa)[1]


def _operations() -> list[str]:
    from flows.config import get_settings
    from flows.web.api import create_api

    spec = create_api(get_settings()).openapi()
    return sorted(f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops)


@pytest.mark.parametrize("operation", _operations())
def test_api_answers_as_its_openapi_document_says(api_schema: Any, fuzz_token: str, operation: str) -> None:
    """schemathesis' own pytest plugin does not run under pytest 9 here ('Function' object has no
    attribute '_nodeid'), so each operation's strategy is driven by hypothesis directly."""
    from hypothesis import given

    method, path = operation.split(" ", 1)
    found = [r.ok() for r in api_schema.get_all_operations() if r.ok().method.upper() == method and r.ok().path == path]
    assert len(found) == 1, operation

    @given(case=found[0].as_strategy())
    @hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {fuzz_token}"})

    fuzz()
