"""Edge of the data path: the integration API, JSON under ``/api/v1``, thin over ``flows.services``
(``tokens`` authenticates and audits, ``integration`` acts). Its OpenAPI document is served at
``/api/v1/openapi.json``.

    GET  /api/v1/health                       no token: for the proxy's health check
    GET  /api/v1/runs                         runs:read       the institution's runs, paged and filtered (no parameters)
    GET  /api/v1/runs/{run_id}                runs:read       one run's status and its steps' states
    GET  /api/v1/runs/{run_id}/record         records:read    the quality record (patient data)
    POST /api/v1/runs                         runs:start      start a run as the token's service account
    GET  /api/v1/users/{username}/inbox       inbox:read      what waits on a user of the institution
    GET  /api/v1/chain/{coi}                  chain:read      the chain of identity of a dose
    POST /api/v1/identifiers/validate         identifiers:validate   a scanned DIN or COI

A client sends ``Authorization: Bearer <token>``. Nothing here signs for a person. Errors are JSON
``{"error": …, "field": …}`` (``field`` names the input at fault, or null; ``errors`` lists every
problem when there are several), with the status of the error's class (``flows.web.base.status_of``:
401 token, 403 scope or institution, 404 not found, 400 bad input) and 429 past the rate limit
(``SOPFLOW_API_RATE`` requests a minute per token in each web process, ``Retry-After`` set).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, and each names a
# dependency made in ``create_api``.
import re
import threading
import time
from collections import deque
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from flows.config import Settings
from flows.errors import FlowsError, SopDefinitionError, SopInputError
from flows.services import integration, runs, tokens
from flows.web.base import message_of, status_of

__all__ = ["create_api", "http_error"]

_bearer = HTTPBearer(auto_error=False, description="An integration token (`sopflow token create`).")


class Error(BaseModel):
    error: str
    field: str | None = None
    errors: list[dict[str, str | None]] | None = None


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    institution: str
    sop_id: str
    sop_version: int
    status: str
    waiting_on: list[str]


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sop_id: str = Field(description="The SOP to start (its Effective version runs).", examples=["dose_receipt"])
    params: dict[str, str | float | bool] = Field(
        default_factory=dict, description="The run's parameters, checked like `sopflow start --set`."
    )


class Started(BaseModel):
    run_id: str
    flow_run_id: str
    sop_id: str
    sop_version: int
    sop_sha256: str


class IdentifierRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["din", "coi"]
    value: str = Field(max_length=200)
    product: str | None = Field(default=None, description="The product a COI belongs to (its coi_pattern).")


class IdentifierResult(BaseModel):
    valid: bool
    value: str
    error: str | None
    field: str | None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in (
        (400, "bad input: `field` names it"),
        (401, "no token, an unknown or revoked one"),
        (403, "outside the token's scopes or institution"),
        (404, "no such thing"),
        (429, "too many requests: see Retry-After"),
    )
}
_FIELD = re.compile(r"^[^:]*?params: (?:unknown field '(?P<unknown>[^']+)'|(?P<name>[A-Za-z_][\w]*): )")


def _error(status: int, error: str, field: str | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(
        Error(error=error, field=field, **extra).model_dump(exclude_none=True) | {"field": field}, status
    )


def http_error(exc: StarletteHTTPException) -> JSONResponse:
    """An HTTP error under /api/ as JSON (the web app's handler calls it for paths its mount does not match)."""
    text = "no such API path; see /api/v1/openapi.json" if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, text)


def _problems(exc: FlowsError) -> list[dict[str, str | None]]:
    out = []
    for problem in getattr(exc, "problems", None) or [message_of(exc)]:
        text = str(problem)
        m = _FIELD.match(text)
        field = f"params.{m.group('unknown') or m.group('name')}" if m else None
        if field is None and isinstance(exc, SopInputError) and ":" in text:
            head = text.split(":", 1)[0].strip()
            field = head if re.fullmatch(r"[A-Za-z_]\w*", head) else None
        out.append({"error": text, "field": field})
    return out


class _RateLimiter:
    """At most ``per_minute`` requests per key in any 60 s (a sliding window, in this process)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> float | None:
        """None when the request may go on (and counts it), else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and now - hits[0] >= 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return 60 - (now - hits[0])
            hits.append(now)
            return None


class _TooMany(Exception):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


def create_api(settings: Settings) -> FastAPI:
    """The integration API over ``settings`` (mounted at ``/api/v1`` by ``flows.web.app``)."""
    api = FastAPI(
        title="sopflow integration API",
        version="1",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        responses=_ERRORS,
    )
    limiter = _RateLimiter(settings.api_rate_per_minute)

    def client_for(action: str, scope: str) -> Any:
        def dependency(
            request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
        ) -> tokens.ApiClient:
            presented = credentials.credentials if credentials else None
            key = tokens.token_key(presented) if presented else f"ip:{request.client.host if request.client else '?'}"
            wait = limiter.retry_after(key)
            if wait is not None:
                raise _TooMany(wait)
            return tokens.authenticate(settings, presented, action, scope, request.url.path)

        return Depends(dependency)

    @api.exception_handler(FlowsError)
    async def _flows_error(request: Request, exc: FlowsError) -> JSONResponse:
        problems = _problems(exc)
        extra = {"errors": problems} if len(problems) > 1 else {}
        status = 400 if isinstance(exc, SopDefinitionError) else status_of(exc)
        return _error(status, problems[0]["error"] or type(exc).__name__, problems[0]["field"], **extra)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
            problems.append({"error": f"{'.'.join(loc) or 'body'}: {e.get('msg')}", "field": ".".join(loc) or None})
        extra = {"errors": problems} if len(problems) > 1 else {}
        return _error(400, problems[0]["error"] or "bad request", problems[0]["field"], **extra)

    @api.exception_handler(_TooMany)
    async def _too_many(request: Request, exc: _TooMany) -> JSONResponse:
        response = _error(429, f"more than {settings.api_rate_per_minute} requests a minute; wait and retry")
        response.headers["Retry-After"] = str(max(1, round(exc.seconds)))
        return response

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error(exc)

    @api.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("sopflow.api").exception("API request %s %s failed", request.method, request.url.path)
        return _error(500, "something went wrong on the server; the error is in the server log")

    def ok(value: Any, status: int = 200) -> JSONResponse:
        return JSONResponse(jsonable_encoder(value), status)

    @api.get("/health", summary="The API answers (no token; for the proxy's health check)")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/runs", response_model=list[RunSummary], summary="The institution's runs, newest first, a page at a time")
    def list_runs(
        client: Annotated[tokens.ApiClient, client_for("runs.list", "runs:read")],
        status: Annotated[
            str | None,
            Query(
                description="A run status, or 'open' (not yet ended)",
                json_schema_extra={"enum": [*runs.RUN_STATUSES, "open"]},  # another value: 400, naming the field
            ),
        ] = None,
        sop_id: Annotated[str | None, Query(description="Only runs of this SOP id")] = None,
        product: Annotated[str | None, Query(description="Only runs of this product (catalogue id)")] = None,
        coi: Annotated[str | None, Query(description="Only runs of this dose (chain-of-identity id)")] = None,
        since: Annotated[
            str | None,
            Query(
                description="Started on or after this UTC day (YYYY-MM-DD; an ISO time is taken too)",
                json_schema_extra={"format": "date"},
            ),
        ] = None,
        until: Annotated[
            str | None,
            Query(
                description="Started on or before this UTC day (YYYY-MM-DD), or before an ISO time",
                json_schema_extra={"format": "date"},
            ),
        ] = None,
        page: Annotated[int, Query(ge=1, le=10**9, description="Which page, newest first")] = 1,
        per_page: Annotated[int, Query(ge=1, le=500, description="Runs per page")] = 50,
    ) -> JSONResponse:
        filters = runs.run_filter(
            status=status,
            sop_id=sop_id,
            product=product,
            coi=coi,
            since=since,
            until=until,
            page=page,
            per_page=per_page,
        )
        return ok(integration.list_runs(settings, client, filters))

    @api.get("/runs/{run_id}", response_model=RunSummary, summary="One run: its status and its steps' states")
    def run(run_id: str, client: Annotated[tokens.ApiClient, client_for("runs.read", "runs:read")]) -> JSONResponse:
        return ok(integration.run_summary(settings, client, run_id))

    @api.get("/runs/{run_id}/record", summary="A run's quality record (as `sopflow record RUN --json`)")
    def record(
        run_id: str, client: Annotated[tokens.ApiClient, client_for("records.read", "records:read")]
    ) -> JSONResponse:
        return ok(integration.record(settings, client, run_id))

    @api.post("/runs", status_code=201, response_model=Started, summary="Start a run as the token's service account")
    def start(
        body: StartRequest, client: Annotated[tokens.ApiClient, client_for("runs.start", "runs:start")]
    ) -> JSONResponse:
        res = integration.start(settings, client, body.sop_id, dict(body.params))
        return ok(Started(**res.__dict__), 201)

    @api.get("/users/{username}/inbox", summary="What waits on a user of the institution")
    def user_inbox(
        username: str, client: Annotated[tokens.ApiClient, client_for("inbox.read", "inbox:read")]
    ) -> JSONResponse:
        return ok(integration.user_inbox(settings, client, username))

    @api.get("/chain/{coi}", summary="The chain of identity of a dose")
    def chain(coi: str, client: Annotated[tokens.ApiClient, client_for("chain.read", "chain:read")]) -> JSONResponse:
        return ok(integration.chain(settings, client, coi))

    @api.post("/identifiers/validate", response_model=IdentifierResult, summary="Check a scanned DIN or COI")
    def validate(
        body: IdentifierRequest,
        client: Annotated[tokens.ApiClient, client_for("identifiers.validate", "identifiers:validate")],
    ) -> JSONResponse:
        return ok(integration.validate_identifier(settings, client, body.kind, body.value, body.product))

    return api
