"""The service floor: runs. Start one, list them, read a run's quality record, wait for a run,
and the deviations and the chain of identity of a dose.

A run opens through ``flows.engine.opening``, the one way every run is opened (sub-runs too);
``start_run`` adds what only a person's start needs: sign-in, who may start
(``guard.start_problem``: a role at the institution, the SOP's ``start_roles``) and the refusal
of a quarantined dose, each refusal audited. Reads of a user's runs and records go through
``guard.reader_problem`` (a role at the run's institution).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.escalation import overdue_steps
from flows.engine.opening import open_run, prepare_run
from flows.errors import (
    NotFoundError,
    RecordError,
    SopInputError,
    SopNotEffectiveError,
    did_you_mean,
)
from flows.record.chain import chain_of_identity as _chain
from flows.record.checkpoints import checkpoint_public, ensure_checkpoint, load_signing_key
from flows.record.db import init_db, read_session, write_session
from flows.record.deviations import list_deviations
from flows.record.query import run_record
from flows.record.state import run_status, step_states
from flows.record.tables import CurrentRun, CurrentStep, SopRun, User
from flows.record.versions import CHANGE_CONTROL_ID, PinnedSop, effective_sop
from flows.services import guard
from flows.services.accounts import user_summary

__all__ = [
    "MAX_PER_PAGE",
    "PER_PAGE",
    "RUN_STATUSES",
    "RunFilter",
    "StartResult",
    "chain_of_identity",
    "deviations",
    "find_run",
    "list_runs",
    "quality_record",
    "record_for",
    "run_filter",
    "runs_for",
    "runs_page",
    "runs_page_for",
    "start_run",
    "start_run_as",
    "wait_for_run",
]


@dataclass(frozen=True)
class StartResult:
    run_id: str
    flow_run_id: str
    sop_id: str
    sop_version: int
    sop_sha256: str


def start_run(
    settings: Settings,
    institution: str,
    sop_id: str,
    raw_params: dict[str, Any],
    username: str,
    password: str,
    *,
    pinned: PinnedSop | None = None,
) -> StartResult:
    """Validate the parameters, record the run, pinned to the SOP's Effective version, and hand it to Prefect.

    ``pinned``: the version to run; only change control passes one, to start the built-in
    change-control SOP, which cannot be started directly.

    Raises:
        SopNotFoundError, SopNotEffectiveError, SopDefinitionError, SopInputError, AuthenticationError,
        NotAuthorizedError, EngineError
    """
    return start_run_as(
        settings,
        institution,
        sop_id,
        raw_params,
        lambda: guard.sign_in(settings, username, password, f"start {sop_id}"),
        pinned=pinned,
    )


def start_run_as(
    settings: Settings,
    institution: str,
    sop_id: str,
    raw_params: dict[str, Any],
    starter: Callable[[], User],
    *,
    pinned: PinnedSop | None = None,
) -> StartResult:
    """``start_run`` for whoever ``starter()`` returns: a person who signed in, or an integration
    token's service account (``flows.services.integration``); the same rules (``guard.start_problem``)."""
    if pinned is None:
        try:
            if sop_id == CHANGE_CONTROL_ID:
                raise SopNotEffectiveError(
                    f"{CHANGE_CONTROL_ID!r} is sopflow's built-in change-control SOP: it runs on a "
                    "draft, started by `sopflow sop submit`, not by `sopflow start`"
                )
            pinned = effective_sop(settings, institution, sop_id)
        except SopNotEffectiveError as exc:  # refused: audited under the user who asked
            user = starter()
            guard.refuse(settings, user.id, "run.start", "sf_run", sop_id, str(exc))
            raise
    prepared = prepare_run(settings, institution, pinned, raw_params, where=f"{sop_id} params")
    user = starter()
    with read_session(settings.database_url) as s:
        problem = guard.start_problem(s, user, institution, pinned.definition)
    if problem is None and prepared.held_by is not None:
        problem = f"{sop_id}: cannot start: {prepared.held_by}"
    if problem:
        raise guard.refuse(settings, user.id, "run.start", "sf_run", sop_id, problem)
    opened = open_run(settings, institution, prepared, started_by=user.id, actor=user.id)
    sop = pinned.definition
    return StartResult(opened.run_id, opened.flow_run_id, sop_id, sop.version, pinned.sha256)


def find_run(session: Session, run_id: str) -> SopRun:
    """A run by id, or by a unique prefix of at least six characters (as ``sopflow runs`` prints them).

    Raises:
        NotFoundError
    """
    run = guard.lookup_run(session, run_id)
    if run is None:
        raise NotFoundError(f"no run {run_id!r}; `sopflow runs` lists them")
    return run


def wait_for_run(
    settings: Settings,
    run_id: str,
    *,
    step: str | None = None,
    statuses: tuple[str, ...] = (),
    timeout: float = 90.0,
    poll: float = 0.05,
) -> dict[str, Any]:
    """Wait until the run waits on ``step`` or has one of ``statuses``; returns its record.

    Raises:
        RecordError: the run failed (and ``failed`` was not asked for), or the time ran out.
    """
    deadline = time.monotonic() + timeout
    while True:
        # Each poll reads only the run's status and its steps' newest records; the whole quality
        # record is built once, when the run is where it was asked to be.
        with read_session(settings.database_url) as s:
            find_run(s, run_id)
            event = run_status(s, run_id)
            newest = step_states(s, run_id).get(step) if step else None
        status = event.status if event else "unknown"
        if status in statuses or (newest is not None and newest.status == "waiting"):
            return quality_record(settings, run_id)
        if status == "failed":
            raise RecordError(f"run {run_id} failed: {event.detail if event else None}")
        if time.monotonic() > deadline:
            raise RecordError(
                f"run {run_id}: still not at {step or statuses} after {timeout:.0f} s "
                f"(status {status}); see `sopflow server status`"
            )
        time.sleep(poll)


RUN_STATUSES = ("scheduled", "running", "waiting", "completed", "rejected", "stopped", "failed")
"""The statuses a run can have (``flows.record.tables.RunEvent``); the runs list also filters by ``open``."""
PER_PAGE = 50
"""Runs per page of the runs list, unless asked otherwise (at most ``MAX_PER_PAGE``)."""
MAX_PER_PAGE = 500


@dataclass(frozen=True)
class RunFilter:
    """What the runs list shows: one page, newest first, of the runs matching every filter given."""

    status: str | None = None
    """A run status (``RUN_STATUSES``) or ``open`` (any not yet final)."""
    sop_id: str | None = None
    product: str | None = None
    """The product's catalogue id."""
    coi: str | None = None
    since: datetime | None = None
    """Started at or after (aware)."""
    until: datetime | None = None
    """Started before (aware)."""
    page: int = 1
    per_page: int = PER_PAGE


def _day(value: str | datetime | None, name: str, problems: list[str], *, end: bool = False) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            problems.append(f"{name}: {value!r} is not a date (YYYY-MM-DD) or a time (YYYY-MM-DDTHH:MM)")
            return None
        if end and len(value.strip()) == 10:  # a day: up to its end
            if moment.date() == moment.max.date():
                return None  # up to the end of time: no bound
            moment += timedelta(days=1)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def run_filter(
    *,
    status: str | None = None,
    sop_id: str | None = None,
    product: str | None = None,
    coi: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    page: int | str | None = None,
    per_page: int | str | None = None,
) -> RunFilter:
    """A ``RunFilter`` from what a person typed (CLI options, query parameters); dates are UTC days
    or ISO times, ``until`` a day includes that day.

    Raises:
        SopInputError: every filter that cannot be used, each named.
    """
    problems: list[str] = []
    if status not in (None, "") and status not in (*RUN_STATUSES, "open"):
        problems.append(f"status: {status!r} is not a run status. {did_you_mean(str(status), (*RUN_STATUSES, 'open'))}")
    numbers: dict[str, int] = {}
    for name, value, default in (("page", page, 1), ("per_page", per_page, PER_PAGE)):
        try:
            numbers[name] = default if value in (None, "") else int(value)
        except ValueError:
            problems.append(f"{name}: {value!r} is not a whole number")
            numbers[name] = default
            continue
        if not 1 <= numbers[name] <= (MAX_PER_PAGE if name == "per_page" else 10**9):
            problems.append(f"{name}: {value!r} is out of range (1 to {MAX_PER_PAGE if name == 'per_page' else 'any'})")
    start, end = _day(since, "since", problems), _day(until, "until", problems, end=True)
    if problems:
        raise SopInputError(problems)
    return RunFilter(
        status=status or None,
        sop_id=sop_id or None,
        product=product or None,
        coi=(coi or "").strip() or None,
        since=start,
        until=end,
        page=numbers["page"],
        per_page=numbers["per_page"],
    )


def _runs_query(filters: RunFilter, institutions: set[str] | None, run_id: str | None) -> Any:
    query = select(CurrentRun, SopRun).join(SopRun, col(SopRun.id) == col(CurrentRun.run_id))
    if run_id is not None:
        query = query.where(CurrentRun.run_id == run_id)
    if institutions is not None:
        query = query.where(col(CurrentRun.institution).in_(sorted(institutions)))
    if filters.status == "open":
        query = query.where(col(CurrentRun.open) == True)  # noqa: E712  (an index on open: not IS TRUE)
    elif filters.status is not None:
        query = query.where(CurrentRun.status == filters.status)
    if filters.sop_id is not None:
        query = query.where(CurrentRun.sop_id == filters.sop_id)
    if filters.product is not None:
        query = query.where(CurrentRun.product == filters.product)
    if filters.coi is not None:
        query = query.where(CurrentRun.coi == filters.coi)
    if filters.since is not None:
        query = query.where(col(CurrentRun.started_at) >= filters.since)
    if filters.until is not None:
        query = query.where(col(CurrentRun.started_at) < filters.until)
    return (
        query.order_by(col(CurrentRun.started_at).desc(), col(CurrentRun.run_id).desc())
        .offset((filters.page - 1) * filters.per_page)
        .limit(filters.per_page + 1)  # one more than shown: whether a next page exists
    )


def list_runs(
    settings: Settings,
    filters: RunFilter | None = None,
    *,
    institutions: set[str] | None = None,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """One page of runs (``filters``; default the newest ``PER_PAGE``), newest first, with status and
    what each waits on; ``institutions``: only theirs. Reads the current-state tables
    (``flows.record.current``): the cost is the page's, whatever the history holds."""
    rows: list[dict[str, Any]] = runs_page(settings, filters, institutions=institutions, run_id=run_id)["runs"]
    return rows


def runs_page(
    settings: Settings,
    filters: RunFilter | None = None,
    *,
    institutions: set[str] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """``list_runs`` with where the page stands: ``{"runs", "page", "per_page", "more"}`` (``more``:
    a next page exists)."""
    filters = filters or RunFilter()
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        overdue: dict[str, list[dict[str, Any]]] = {}
        for o in overdue_steps(s):
            overdue.setdefault(o.run.id, []).append(
                {"step_id": o.step.id, "since": o.due, "escalated_at": o.escalated_at}
            )
        rows = list(s.exec(_runs_query(filters, institutions, run_id)))
        more = len(rows) > filters.per_page
        rows = rows[: filters.per_page]
        waiting: dict[str, list[str]] = {}
        if rows:
            steps = s.exec(
                select(CurrentStep.run_id, CurrentStep.step_id)
                .where(
                    col(CurrentStep.run_id).in_([cur.run_id for cur, _ in rows]),
                    col(CurrentStep.status).in_(("waiting", "signed", "held")),
                )
                .order_by(col(CurrentStep.run_id), col(CurrentStep.first_n))
            )
            for rid, step_id in steps:
                waiting.setdefault(rid, []).append(step_id)
        for cur, run in rows:
            out.append(
                {
                    "id": run.id,
                    "institution": run.institution,
                    "sop_id": run.sop_id,
                    "sop_version": run.sop_version,
                    "status": cur.status or "unknown",
                    "detail": cur.detail if cur.status else None,
                    "waiting_on": waiting.get(run.id, []),
                    "overdue": overdue.get(run.id, []),
                    "started_at": run.started_at,
                    "flow_run_id": run.flow_run_id,
                    "product": cur.product,
                    "coi": cur.coi,
                }
            )
    return {"runs": out, "page": filters.page, "per_page": filters.per_page, "more": more}


def runs_for(settings: Settings, username: str, filters: RunFilter | None = None) -> list[dict[str, Any]]:
    """``list_runs``, only the runs of institutions where the user holds a role."""
    rows: list[dict[str, Any]] = runs_page_for(settings, username, filters)["runs"]
    return rows


def runs_page_for(settings: Settings, username: str, filters: RunFilter | None = None) -> dict[str, Any]:
    """``runs_page``, only the runs of institutions where the user holds a role (the web's runs page)."""
    mine = user_summary(settings, username)["roles"]
    return runs_page(settings, filters, institutions=set(mine))


def quality_record(settings: Settings, run_id: str, *, export: bool = False) -> dict[str, Any]:
    """A run's quality record (``flows.record.query.run_record``). An ``export`` (``sopflow record
    --json``, the API) carries the newest signed checkpoint of the audit chain, made now when none
    covers the head, read under the write lock so it covers exactly the export's ``audit_head``.

    Raises:
        NotFoundError. ConfigError: the checkpoint key file cannot be used.
    """
    init_db(settings.database_url)
    if not export:
        with read_session(settings.database_url) as s:
            return run_record(s, find_run(s, run_id).id)
    key = load_signing_key(settings)
    with write_session(settings.database_url) as s:
        cp = ensure_checkpoint(s, key)
        rec = run_record(s, find_run(s, run_id).id)
        rec["checkpoint"] = checkpoint_public(cp, key.public) if cp else None
        return rec


def record_for(settings: Settings, username: str, run_id: str) -> dict[str, Any]:
    """``quality_record`` for a user with a role at the run's institution.

    Raises:
        NotFoundError: ``guard.NO_SUCH_RUN``, alike for no such run and a run the user may not read.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return run_record(s, guard.readable_run(s, username, run_id).id)


def deviations(settings: Settings, *, now: Any = None, include_closed: bool = False) -> dict[str, Any]:
    """Open deviations (oldest first) with their lifecycle, and every overdue CAPA action (``sopflow deviations``)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return list_deviations(s, now, include_closed=include_closed)


def chain_of_identity(settings: Settings, coi: str) -> dict[str, Any]:
    """Every run that touched one dose (COI), in order, with sub-runs and deviations, and whether the
    chain collection → receipt → storage → infusion is unbroken (``sopflow chain``)."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return _chain(s, coi)
