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
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.escalation import overdue_steps
from flows.engine.opening import open_run, prepare_run
from flows.errors import NotFoundError, RecordError, SopNotEffectiveError
from flows.record.chain import chain_of_identity as _chain
from flows.record.db import init_db, read_session
from flows.record.deviations import list_deviations
from flows.record.query import run_record
from flows.record.state import run_status, step_states
from flows.record.tables import SopRun, User
from flows.record.versions import CHANGE_CONTROL_ID, PinnedSop, effective_sop
from flows.services import guard
from flows.services.accounts import user_summary

__all__ = [
    "StartResult",
    "chain_of_identity",
    "deviations",
    "find_run",
    "list_runs",
    "quality_record",
    "record_for",
    "runs_for",
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


def list_runs(settings: Settings) -> list[dict[str, Any]]:
    """Every run, newest first, with its status and what it waits on."""
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        overdue: dict[str, list[dict[str, Any]]] = {}
        for o in overdue_steps(s):
            overdue.setdefault(o.run.id, []).append(
                {"step_id": o.step.id, "since": o.due, "escalated_at": o.escalated_at}
            )
        for run in s.exec(select(SopRun).order_by(col(SopRun.started_at).desc())):
            st = run_status(s, run.id)
            waiting = [k for k, r in step_states(s, run.id).items() if r.status in ("waiting", "signed", "held")]
            out.append(
                {
                    "id": run.id,
                    "institution": run.institution,
                    "sop_id": run.sop_id,
                    "sop_version": run.sop_version,
                    "status": st.status if st else "unknown",
                    "detail": st.detail if st else None,
                    "waiting_on": waiting,
                    "overdue": overdue.get(run.id, []),
                    "started_at": run.started_at,
                    "flow_run_id": run.flow_run_id,
                }
            )
    return out


def runs_for(settings: Settings, username: str) -> list[dict[str, Any]]:
    """``list_runs``, only the runs of institutions where the user holds a role."""
    mine = user_summary(settings, username)["roles"]
    return [r for r in list_runs(settings) if r["institution"] in mine]


def quality_record(settings: Settings, run_id: str) -> dict[str, Any]:
    """A run's quality record (``flows.record.query.run_record``). Raises NotFoundError."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return run_record(s, find_run(s, run_id).id)


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
