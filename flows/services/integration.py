"""The service floor: what the integration API (``flows.web.api``) does for an authenticated token
(``flows.services.tokens.ApiClient``). Every function checks that what is asked belongs to the
token's institution (refused, audited ``api.<action>.refused``, when not), does it through the same
functions the CLI and the web call, and records the use (``api.<action>``).

Nothing here signs: the API reads, starts runs as the token's service account, and checks
identifiers. Signing stays with people, who re-authenticate for every signature.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import NotFoundError, SopInputError, did_you_mean
from flows.record.db import read_session
from flows.record.tables import SopRun
from flows.record.users import find_user
from flows.services import guard, inbox, runs
from flows.services.tokens import ApiClient, audit_use, find_account
from flows.sop.catalog import Catalog
from flows.sop.inputs import coerce_values
from flows.sop.model import FieldSpec

__all__ = ["chain", "list_runs", "record", "run_summary", "start", "user_inbox", "validate_identifier"]


def _refuse(
    settings: Settings, client: ApiClient, action: str, object_type: str, object_id: str, problem: str
) -> Exception:
    return guard.refuse(settings, client.account_id, f"api.{action}", object_type, object_id, problem)


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "institution", "sop_id", "sop_version", "status", "detail", "waiting_on", "started_at")
    return {k: row[k] for k in keep} | {"overdue": [o["step_id"] for o in row.get("overdue", [])]}


def list_runs(settings: Settings, client: ApiClient, filters: runs.RunFilter | None = None) -> list[dict[str, Any]]:
    """One page of the institution's runs (``filters``, as ``sopflow runs``), newest first: status and
    what each waits on (no parameters)."""
    rows = [_summary(r) for r in runs.list_runs(settings, filters, institutions={client.institution})]
    audit_use(settings, client, "runs.list", "sf_api_token", client.token_id, count=len(rows))
    return rows


NO_SUCH_USER = "no such user at the token's institution"
NO_SUCH_COI = "no such dose (COI) among the runs of the token's institution"


def _own_run(settings: Settings, client: ApiClient, run_id: str, action: str) -> SopRun:
    """The run, if it is of the token's institution; else ``guard.NO_SUCH_RUN`` (404), alike for a
    run that does not exist and one of another institution (that refusal is audited)."""
    with read_session(settings.database_url) as s:
        # A whole id of another institution's run is a refusal, audited; a prefix counts only the
        # token's institution's runs, so a match elsewhere changes nothing.
        run = s.get(SopRun, run_id) or guard.lookup_run(s, run_id, among={client.institution})
        if run is not None:
            s.expunge(run)
    if run is not None and run.institution != client.institution:
        _refuse(
            settings,
            client,
            action,
            "sf_run",
            run.id,
            f"token {client.name!r} belongs to {client.institution!r}; run {run.id} is of {run.institution!r}",
        )
    if run is None or run.institution != client.institution:
        raise NotFoundError(guard.NO_SUCH_RUN)
    return run


def run_summary(settings: Settings, client: ApiClient, run_id: str) -> dict[str, Any]:
    """One run's status and its steps' states (no values).

    Raises:
        NotFoundError (``guard.NO_SUCH_RUN``)
    """
    run = _own_run(settings, client, run_id, "runs.read")
    rec = runs.quality_record(settings, run.id)
    row = runs.list_runs(settings, run_id=run.id)[0]
    steps = [{"id": s["id"], "kind": s["kind"], "status": s["status"]} for s in rec["steps"]]
    audit_use(settings, client, "runs.read", "sf_run", run.id)
    return _summary(row) | {"steps": steps, "flow_run_id": row["flow_run_id"]}


def record(settings: Settings, client: ApiClient, run_id: str) -> dict[str, Any]:
    """A run's whole quality record (``sopflow record RUN --json``).

    Raises:
        NotFoundError (``guard.NO_SUCH_RUN``)
    """
    run = _own_run(settings, client, run_id, "records.read")
    rec = runs.quality_record(settings, run.id, export=True)
    audit_use(settings, client, "records.read", "sf_run", run.id)
    return rec


def user_inbox(settings: Settings, client: ApiClient, username: str) -> list[dict[str, Any]]:
    """What waits on ``username`` at the token's institution (a ward display, a pager gateway).

    Raises:
        NotFoundError (``NO_SUCH_USER``: no such user, or none with a role at the institution: alike)
    """
    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        held = guard.institutions_of(s, user.id) if user is not None else set()
    if user is not None and client.institution not in held:
        _refuse(
            settings,
            client,
            "inbox.read",
            "sf_user",
            username,
            f"token {client.name!r} belongs to {client.institution!r}, where user {username!r} holds no role",
        )
    if client.institution not in held:  # alike for no such user and a user of another institution
        raise NotFoundError(NO_SUCH_USER)
    items = [i for i in inbox.inbox(settings, username) if i["institution"] == client.institution]
    audit_use(settings, client, "inbox.read", "sf_user", username, count=len(items))
    return items


def chain(settings: Settings, client: ApiClient, coi: str) -> dict[str, Any]:
    """The chain of identity of a dose whose runs are all at the token's institution.

    Raises:
        NotFoundError (``NO_SUCH_COI``: no run carries the COI, or one of another institution does: alike)
    """
    res = runs.chain_of_identity(settings, coi)
    ids = [r["run_id"] for r in res["runs"]]
    with read_session(settings.database_url) as s:
        elsewhere = sorted(
            set(s.exec(select(SopRun.institution).where(col(SopRun.id).in_(ids)))) - {client.institution}
        )
    if elsewhere:
        _refuse(
            settings,
            client,
            "chain.read",
            "coi",
            coi,
            f"token {client.name!r} belongs to {client.institution!r}; the chain of {coi!r} has runs of "
            f"{', '.join(map(repr, elsewhere))}",
        )
    if not ids or elsewhere:  # alike for an unknown COI and one with runs of another institution
        raise NotFoundError(NO_SUCH_COI)
    audit_use(settings, client, "chain.read", "coi", coi)
    return res


def start(settings: Settings, client: ApiClient, sop_id: str, params: dict[str, Any]) -> runs.StartResult:
    """Start a run as the token's service account (its roles and the SOP's ``start_roles`` decide).

    Raises:
        as ``runs.start_run``, except AuthenticationError
    """
    account = find_account(settings, client)
    res = runs.start_run_as(settings, client.institution, sop_id, params, lambda: account)
    audit_use(settings, client, "runs.start", "sf_run", res.run_id, sop_id=sop_id, sop_version=res.sop_version)
    return res


def validate_identifier(
    settings: Settings, client: ApiClient, kind: str, value: str, product: str | None
) -> dict[str, Any]:
    """Check a scanned identifier the way a step's field is checked: ``din`` (ISBT 128, its check
    character) or ``coi`` (the product's ``coi_pattern`` in the institution's catalogue).

    Returns ``{valid, value (normalised), error, field}``: a COI without a product, or of a product the
    catalogue does not have, is not valid (``field`` ``product``), like a wrong value (``field`` ``value``).

    Raises:
        SopInputError: an unknown kind.
    """
    if kind not in ("din", "coi"):
        raise SopInputError([f"kind: expected 'din' or 'coi', got {kind!r}"])
    spec = FieldSpec.model_validate({"type": "text", "format": "isbt128_din" if kind == "din" else "coi"})
    entry, problem = None, None
    if kind == "coi":
        products = Catalog(settings.sops_dir, settings.templates_dir).institution(client.institution).products
        if not product:
            problem = "a COI is checked against a product's coi_pattern; name the product"
        elif product not in products:
            hint = did_you_mean(product, sorted(products), "Products") or ""
            problem = f"no product {product!r} at {client.institution!r}. {hint}".rstrip()
        else:
            entry = (product, products[product])
    if problem is not None:
        result: dict[str, Any] = {"valid": False, "value": value, "error": problem, "field": "product"}
        audit_use(settings, client, "identifiers.validate", "sf_api_token", client.token_id, kind=kind, valid=False)
        return result
    try:
        checked = coerce_values({"value": spec}, {"value": value}, where="identifier", product=entry)
        result = {"valid": True, "value": checked["value"], "error": None, "field": None}
    except SopInputError as exc:
        message = str(exc.problems[0]).removeprefix("identifier: value: ")
        result = {"valid": False, "value": value, "error": message, "field": "value"}
    audit_use(
        settings, client, "identifiers.validate", "sf_api_token", client.token_id, kind=kind, valid=result["valid"]
    )
    return result
