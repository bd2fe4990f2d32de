"""The service floor: deviations for people. The list of an institution's deviations (open first,
with dispositions, quarantine and CAPA actions, overdue ones marked), one deviation with its
lifecycle, and raising one by hand on a run or a dose (issue 14).

``raise_deviation`` is the one way a person opens a deviation: who may is asked of
``guard.deviation_problem`` (a role at the run's institution; ``qa`` to quarantine the dose), a
refusal is audited (``deviation.raise.refused``), the ``Deviation`` row is written through the
ledger (``deviation.open``, the actor named) and, when the institution has an SOP that handles
deviations (one with ``updates_deviation`` steps, such as ``deviation_capa``), a run of it is started
on the deviation (recorded as its ``subrun`` event), so its disposition and CAPA follow the same
signed path as a failed check's.
Other services may call it (a rule such as "a run with an open major deviation cannot complete"
reads the same rows through ``flows.record.deviations``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.errors import FlowsError, NotFoundError, SopInputError
from flows.record import ledger
from flows.record.chain import chain_of_identity as _chain
from flows.record.db import init_db, read_session, write_session
from flows.record.deviations import append_deviation_event, deviation_state, list_deviations, run_coi
from flows.record.tables import Deviation, SopRun, utcnow
from flows.record.users import find_user
from flows.record.versions import effective_version, known_sop_ids, stored_sop, version_definition
from flows.services import guard
from flows.services.runs import start_run

__all__ = [
    "CLASSIFICATIONS",
    "MANUAL_STEP",
    "chain_for",
    "deviation_detail",
    "deviation_list",
    "handling_sop",
    "raise_deviation",
]

CLASSIFICATIONS = ("minor", "major", "critical")
MANUAL_STEP = "raised_by_hand"
"""The ``step_id`` of a deviation a person raised (not a check, time-out or deadline)."""


def _institutions(settings: Settings, username: str) -> set[str]:
    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        return guard.institutions_of(s, user.id) if user else set()


def deviation_list(
    settings: Settings, username: str, *, now: datetime | None = None, include_closed: bool = True
) -> dict[str, Any]:
    """The deviations of the institutions where the user holds a role: open ones first (oldest
    first), then the rest newest first; every overdue CAPA action; and counts by state."""
    init_db(settings.database_url)
    mine = _institutions(settings, username)
    with read_session(settings.database_url) as s:
        listed = list_deviations(s, now, include_closed=include_closed)
    devs = [d for d in listed["deviations"] if d["institution"] in mine]
    open_ = [d for d in devs if d["status"] != "closed"]
    closed = sorted((d for d in devs if d["status"] == "closed"), key=lambda d: d["opened_at"], reverse=True)
    for d in devs:
        d["by_hand"] = d["step_id"] == MANUAL_STEP
    capas = [c for c in listed["overdue_capas"] if any(c["deviation_id"] == d["id"] for d in devs)]
    return {
        "now": listed["now"],
        "deviations": open_ + closed,
        "overdue_capas": capas,
        "counts": {
            "open": sum(1 for d in open_ if d["status"] == "open"),
            "dispositioned": sum(1 for d in open_ if d["status"] == "dispositioned"),
            "quarantined": sum(1 for d in devs if d["quarantined"]),
            "closed": len(closed),
        },
    }


def deviation_detail(settings: Settings, username: str, deviation_id: str) -> dict[str, Any]:
    """One deviation with its lifecycle, for a reader with a role at its institution.

    Raises:
        NotFoundError: no such deviation, or one of an institution where the user holds no role (alike).
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        dev = s.get(Deviation, deviation_id)
        state = deviation_state(s, dev) if dev is not None else None
        if state is None or guard.reader_problem(s, username, state["institution"] or "") is not None:
            raise NotFoundError(guard.NO_SUCH_DEVIATION)  # alike: a reader cannot tell which
    state["by_hand"] = state["step_id"] == MANUAL_STEP
    return state


def handling_sop(settings: Settings, institution: str) -> str | None:
    """The institution's SOP that handles deviations (its Effective version has ``updates_deviation``
    steps and a ``deviation_id`` param), or None."""
    with read_session(settings.database_url) as s:
        for sop_id in sorted(known_sop_ids(settings, s, institution)):
            version = effective_version(s, institution, sop_id)
            if version is None:
                continue
            sop = version_definition(version)
            if "deviation_id" in sop.params and any(getattr(st, "updates_deviation", None) for st in sop.steps):
                return sop_id
    return None


def chain_for(settings: Settings, username: str, coi: str) -> dict[str, Any]:
    """``sopflow chain``: every run on one dose, for a reader with a role at its institutions (runs
    of other institutions are left out)."""
    init_db(settings.database_url)
    mine = _institutions(settings, username)
    with read_session(settings.database_url) as s:
        chain = _chain(s, coi)
        where = {r["run_id"]: (run.institution if (run := s.get(SopRun, r["run_id"])) else None) for r in chain["runs"]}
    hidden = [r["run_id"][:8] for r in chain["runs"] if where.get(r["run_id"]) not in mine]
    chain["runs"] = [r for r in chain["runs"] if where.get(r["run_id"]) in mine]
    if not chain["runs"]:  # a dose only elsewhere reads like one nobody knows
        chain["unbroken"], chain["problems"] = False, [f"no run carries COI {chain['coi']!r}"]
    elif hidden:  # nor do the problems name runs of other institutions
        chain["problems"] = [p for p in chain["problems"] if not any(h in p for h in hidden)]
    return chain


def _dose_run(settings: Settings, coi: str, username: str) -> str:
    """The newest top-level run carrying ``coi`` (a deviation on a dose is recorded on it) at an
    institution where ``username`` holds a role: of a dose elsewhere they learn nothing."""
    mine = _institutions(settings, username)
    with read_session(settings.database_url) as s:
        for run in s.exec(select(SopRun).order_by(col(SopRun.started_at).desc())):
            if run.institution in mine and run.parent_run_id is None and run_coi(run, stored_sop(s, run)) == coi:
                return run.id
    raise NotFoundError(f"no run carries COI {coi!r}; `sopflow chain {coi}` shows what sopflow knows of it")


def raise_deviation(
    settings: Settings,
    *,
    username: str,
    password: str,
    classification: str,
    description: str,
    run_id: str | None = None,
    coi: str | None = None,
    quarantine: bool = False,
    handle: bool = True,
) -> dict[str, Any]:
    """Open a deviation by hand on a run (or on the newest run of a dose, by its COI), signed in and
    audited; with ``handle`` (default) start the institution's deviation SOP on it. Returns
    ``{"deviation_id", "run_id", "handling_run_id", "handling_problem"}``: a handling run that cannot
    start leaves the deviation recorded and says why.

    Raises:
        SopInputError (no description, unknown classification), NotFoundError (no such run or COI),
        AuthenticationError, NotAuthorizedError
    """
    init_db(settings.database_url)
    description = (description or "").strip()
    problems = []
    if not description:
        problems.append("describe the deviation: what happened, where and when")
    if classification not in CLASSIFICATIONS:
        problems.append(f"classification {classification!r}: expected minor, major or critical")
    if problems:
        raise SopInputError(problems)
    if run_id is None:
        if not coi:
            raise SopInputError(["name the run or the dose (COI) the deviation is about"])
        run_id = _dose_run(settings, coi.strip(), username)
    user = guard.sign_in(settings, username, password, f"raise a deviation on {run_id}")
    with read_session(settings.database_url) as s:
        # A whole id of a run elsewhere is a refusal, audited; a prefix counts only the reporter's runs.
        run = s.get(SopRun, run_id) or guard.lookup_run(s, run_id, among=guard.institutions_of(s, user.id))
        if run is None:
            raise NotFoundError(guard.NO_SUCH_RUN)
        s.expunge(run)
        stranger = not guard.may_read(s, username, run.institution)
        problem = guard.deviation_problem(s, user, run.institution, quarantine=quarantine)
    if problem:
        refusal = guard.refuse(settings, user.id, "deviation.raise", "sf_run", run.id, problem)  # audited
        if stranger:  # no role at the run's institution: answered as if there were no such run
            raise NotFoundError(guard.NO_SUCH_RUN)
        raise refusal
    with write_session(settings.database_url) as s:
        dev = Deviation(
            run_id=run.id,
            step_id=MANUAL_STEP,
            classification=classification,
            description=description,
            quarantine=quarantine,
            opened_at=utcnow(),
        )
        ledger.append(s, dev, actor=user.id, action="deviation.open", reason=description)
        dev_id = dev.id
        dose = run_coi(run, stored_sop(s, run))
    out: dict[str, Any] = {"deviation_id": dev_id, "run_id": run.id, "handling_run_id": None, "handling_problem": None}
    sop_id = handling_sop(settings, run.institution) if handle else None
    if sop_id is not None:
        with read_session(settings.database_url) as s:
            version = effective_version(s, run.institution, sop_id)
            declared = version_definition(version).params if version else {}
        wanted = {"deviation_id": dev_id, "coi": dose, "parent_run_id": run.id}
        params = {k: v for k, v in wanted.items() if k in declared and v}
        try:
            out["handling_run_id"] = start_run(settings, run.institution, sop_id, params, username, password).run_id
        except FlowsError as exc:  # the deviation stands; its handling is started by hand
            out["handling_problem"] = f"{sop_id} was not started: {exc}"
        else:  # as for a failed check's: the handling run is the deviation's, and its dispositions decide it
            with write_session(settings.database_url) as s:
                append_deviation_event(
                    s,
                    dev_id,
                    "subrun",
                    {"run_id": out["handling_run_id"], "sop_id": sop_id},
                    run_id=run.id,
                    step_id=MANUAL_STEP,
                    actor_id=user.id,
                )
    return out
