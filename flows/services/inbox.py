"""The service floor: what waits on a person. ``inbox`` lists the steps waiting on any role the
user holds, oldest first; ``urgent_inbox`` (the web's) orders them overdue first, then by time
left (a step's time-out, a repetition's due time, or the nearest SOP deadline still counting
down), then oldest. Each item says whether this user may sign it (``guard.signer_problem``).

What waits is the same for every reader: the *board* (every human step waiting now, with its
run, SOP, deadlines and time-out) is read from the current-state tables once per state of the
record and kept in the process, keyed by the audit chain's head (seq and hash: every write to the
record appends an event under the write lock, so a new head is the only way what waits can
change; one indexed read tells). A reader's own part (which roles they hold, whether they may
sign: account, training, separation of duties) is worked out at their sign-in on the web (``warm``)
or at their first read of a board, and kept with it, since those are record rows too; what depends on the clock (overdue, time left, a
deadline running or past due) is worked out at every call. Twenty people with the inbox open cost
one board read per change, not twenty per refresh; every process (and host) checks the head in
the shared database itself.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.escalation import timed_waits
from flows.engine.gates import find_human_step, human_fields
from flows.errors import AuthenticationError
from flows.record.db import init_db, read_session
from flows.record.deadlines import count_down, deadline_states, repetitions
from flows.record.dose import dose_facts
from flows.record.state import signers_by_run
from flows.record.tables import AuditEvent, CurrentStep, SopRun, StepRecord, utcnow
from flows.record.users import find_user, roles_of
from flows.record.versions import stored_sop
from flows.services import guard
from flows.services.library import institution_timezone
from flows.sop.model import HumanStepSpec, RecordStepSpec, SopDefinition

__all__ = ["inbox", "urgent_inbox", "warm"]


@dataclass(frozen=True)
class _Waiting:
    """One human step waiting now, as every reader shares it (nothing here depends on who asks or
    on the clock)."""

    run: SopRun
    """Detached from the session that read it: read-only, shared across threads."""
    sop: SopDefinition
    step: HumanStepSpec
    since: datetime
    due_at: str | None
    """A repetition's due time (``_repetition_due``)."""
    deadlines: list[dict[str, Any]]
    """The run's deadlines counting down or past due, as ``deadline_states`` gave them."""
    falls_due: datetime | None
    """When the time-out passes (``escalation.timed_waits``): overdue from then on."""
    params: dict[str, Any]
    fields: dict[str, dict[str, Any]]
    dose: dict[str, Any]


@dataclass(frozen=True)
class _Board:
    head: tuple[int, str] | None
    waiting: list[_Waiting]
    signers: dict[str, list[tuple[str, str]]]
    """run id → (step id, user id) of every signature of the run (``state.signers_by_run``)."""
    readers: dict[str, list[tuple[_Waiting, str | None]]] = field(default_factory=dict)
    """username → the steps waiting on a role they hold, each with why they may not sign it (None:
    they may), worked out at their first read of this board. Roles, accounts, training and
    signatures are rows of the record like any other, so they too change only with the head."""


_boards: dict[str, _Board] = {}
_building = threading.Lock()


def _head(session: Session) -> tuple[int, str] | None:
    """The newest event that may change what waits or who may sign it: any but a sign-in's
    (``auth.*``: row-less events on an account; a lock or a disable is a ``user.*`` row). Every
    sign-in writes one, and a board read again for each would cost every reader a rebuild."""
    ev = session.execute(_HEAD).first()  # every inbox read asks: a plain statement, a quarter of the ORM's cost
    return (int(ev[0]), str(ev[1])) if ev is not None else None


_AUDIT = AuditEvent.__table__  # type: ignore[attr-defined]
_HEAD = (
    sa_select(_AUDIT.c.seq, _AUDIT.c.hash)
    .where(_AUDIT.c.action.not_like("auth.%"))
    .order_by(_AUDIT.c.seq.desc())
    .limit(1)
)


def _board(session: Session, url: str) -> _Board:
    """The board of the record as it stands: the kept one while the chain's head has not moved."""
    head = _head(session)  # first: a board read after it is at least this new
    board = _boards.get(url)
    if board is not None and board.head == head:
        return board
    with _building:  # one reader builds it, the others wait and take it
        board = _boards.get(url)
        if board is None or board.head != head:
            board = _read_board(session, head)
            _boards[url] = board
    return board


def _read_board(session: Session, head: tuple[int, str] | None) -> _Board:
    # Only the runs with a step waiting now (the current-state index), never the whole history.
    runs = list(
        session.exec(
            select(SopRun)
            .where(col(SopRun.id).in_(select(CurrentStep.run_id).where(CurrentStep.status == "waiting")))
            .order_by(col(SopRun.started_at))
        )
    )
    # Every step's newest record of those runs in one read, in the order the steps appeared
    # (as ``step_states`` gives them).
    newest: dict[str, dict[str, StepRecord]] = {}
    if runs:
        for cur, rec in session.exec(
            select(CurrentStep, StepRecord)
            .join(StepRecord, col(StepRecord.id) == col(CurrentStep.record_id))
            .where(col(CurrentStep.run_id).in_([r.id for r in runs]))
            .order_by(col(CurrentStep.run_id), col(CurrentStep.first_n))
        ):
            newest.setdefault(cur.run_id, {})[cur.step_id] = rec
    falls_due = {(o.run.id, o.step.id): o.due for o in timed_waits(session)}
    facts: dict[tuple[str, ...], Any] = {}
    signers_by_run(session, [r.id for r in runs], facts)  # every run's signers, in one read
    waiting: list[_Waiting] = []
    for run in runs:
        states = newest.get(run.id, {})
        if not any(rec.status == "waiting" for rec in states.values()):
            continue  # runs between steps: nothing to show, nothing to parse
        sop = stored_sop(session, run)
        clocks: list[dict[str, Any]] | None = None
        for step_id, rec in states.items():
            step = find_human_step(sop, step_id)
            if rec.status != "waiting" or step is None:
                continue
            if clocks is None:  # the run's deadlines still counting down (or past due): "time left"
                clocks = [d for d in deadline_states(session, run, sop) if d["state"] in ("running", "overdue")]
            waiting.append(
                _Waiting(
                    run=run,
                    sop=sop,
                    step=step,
                    since=rec.at,
                    due_at=_repetition_due(session, run.id, sop, step_id, states),
                    deadlines=clocks,
                    falls_due=falls_due.get((run.id, step_id)),
                    params=json.loads(run.params_json),
                    fields={k: f.model_dump(exclude_none=True) for k, f in human_fields(step).items()},
                    dose=dose_facts(run, sop),
                )
            )
    session.expunge_all()  # the runs outlive this session: detached, their loaded values kept
    signers = {k[1]: v for k, v in facts.items() if k[0] == "signers"}
    return _Board(head, sorted(waiting, key=lambda w: w.since), signers)


def warm(settings: Settings, reader: str | None = None) -> None:
    """Read the board now (a web process at start), so the first readers do not wait for it; with
    ``reader``, also that reader's part of it (at their sign-in).

    Raises:
        AuthenticationError: no user ``reader``.
    """
    if reader is not None:
        _mine(settings, reader)
        return
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        _board(s, settings.database_url)


def _mine(settings: Settings, username: str) -> list[tuple[_Waiting, str | None]]:
    """The steps waiting on a role ``username`` holds (oldest first), each with why they may not sign
    it (``guard.signer_problem``; None: they may).

    Raises:
        AuthenticationError: no such user.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        board = _board(s, settings.database_url)
        mine = board.readers.get(username)
        if mine is not None:
            return mine
        user = find_user(s, username)
        if user is None:
            raise AuthenticationError(f"no user {username!r}")
        facts: dict[tuple[str, ...], Any] = {("signers", k): v for k, v in board.signers.items()}
        mine = []
        for w in board.waiting:
            key = ("roles", user.id, w.run.institution)
            if key not in facts:
                facts[key] = roles_of(s, user.id, w.run.institution)
            if w.step.role in facts[key]:
                mine.append((w, guard.signer_problem(s, w.run, w.sop, w.step, user.id, facts=facts)))
        board.readers[username] = mine  # a reader racing this one works out the same list
    return mine


def _item(w: _Waiting, cannot_sign: str | None, now: datetime) -> dict[str, Any]:
    return {
        "run_id": w.run.id,
        "sop_id": w.run.sop_id,
        "institution": w.run.institution,
        "step_id": w.step.id,
        "title": w.step.title or w.step.id,
        "role": w.step.role,
        "since": w.since,
        "timeout": w.step.timeout,
        "params": dict(w.params),
        "fields": {k: dict(f) for k, f in w.fields.items()},
        "cannot_sign": cannot_sign,
        "overdue_since": w.falls_due if w.falls_due is not None and w.falls_due <= now else None,
        "deadlines": [_counted(d, now) for d in w.deadlines],
        "due_at": w.due_at,
    }


def inbox(settings: Settings, username: str) -> list[dict[str, Any]]:
    """The steps waiting now on any role the user holds (oldest first).

    Raises:
        AuthenticationError: no such user.
    """
    now = utcnow()
    return [_item(w, cannot, now) for w, cannot in _mine(settings, username)]


def _repetition_due(
    session: Session, run_id: str, sop: SopDefinition, step_id: str, states: dict[str, StepRecord]
) -> str | None:
    """When repetition ``<step>#<n>`` is due (the previous one's signing + ``every``); None otherwise."""
    base, _, n = step_id.partition("#")
    if not n:
        return None
    step = sop.step(base)
    if not isinstance(step, RecordStepSpec):
        return None
    due: str | None = repetitions(session, run_id, step, states)["next_due_at"]
    return due


def _moment(value: datetime | str) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def urgent_inbox(
    settings: Settings, username: str, now: datetime | None = None, *, first: int = 0, limit: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """``inbox`` with ``due_at`` and ``seconds_left`` (negative: overdue) and the institution's zone,
    most urgent first: overdue steps, then steps with a due time by time left, then the rest oldest
    first; ``limit`` items from the ``first`` (all: None), and how many wait in all. Each item also
    carries its run's ``dose`` (``dose_facts``) and ``sop`` (the definition: for words in a language).

    Raises:
        AuthenticationError: no such user.
    """
    now = now or utcnow()
    ranked = sorted(((_due(w), w, cannot) for w, cannot in _mine(settings, username)), key=lambda r: _urgency(r, now))
    zones: dict[str, str] = {}
    shown = []
    for (due, clocks), w, cannot in ranked[first : None if limit is None else first + limit]:
        it = _item(w, cannot, now)  # items only for what is shown
        it["clocks"] = [{**c, "seconds_left": (c["due_at"] - now).total_seconds()} for c in clocks]
        it["due_at"] = due
        it["seconds_left"] = (due - now).total_seconds() if due is not None else None
        if it["institution"] not in zones:
            zones[it["institution"]] = institution_timezone(settings, it["institution"])
        it["timezone"] = zones[it["institution"]]
        it["dose"], it["sop"] = dict(w.dose), w.sop
        shown.append(it)
    return shown, len(ranked)


def _due(w: _Waiting) -> tuple[datetime | None, list[dict[str, Any]]]:
    """When the step is due (a repetition's due time, else its time-out, or a nearer SOP deadline
    still counting down: thaw to end of infusion…) and those deadlines, each with its ``due_at``."""
    due: datetime | None = _moment(w.due_at) if w.due_at else None
    if due is None and w.step.timeout is not None:
        due = w.since + w.step.timeout
    clocks = []
    for clock in w.deadlines:
        if not clock.get("due_at"):
            continue
        at = _moment(clock["due_at"])
        clocks.append({"title": clock["title"], "due_at": at})
        due = at if due is None or at < due else due
    return due, clocks


def _counted(deadline: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A kept deadline as it stands ``now`` (the board is older than the call)."""
    out = dict(deadline)
    if out.get("due_at") and out["state"] in ("running", "overdue"):
        count_down(out, now)
    return out


def _urgency(
    ranked: tuple[tuple[datetime | None, list[dict[str, Any]]], _Waiting, str | None], now: datetime
) -> tuple[int, float, datetime]:
    """Overdue first (by the clock or its time-out), then by time left, then the rest oldest first."""
    (due, _), w, _ = ranked
    left = (due - now).total_seconds() if due is not None else None
    overdue = w.falls_due is not None and w.falls_due <= now
    rank = 0 if (left is not None and left < 0) or overdue else 1 if left is not None else 2
    return rank, left if left is not None else 0.0, w.since
