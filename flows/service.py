"""The service layer: every action the CLI (and later the web app) offers, in one place.

Views stay thin: they parse input, call one of these, and format the result or the error.
No business rule lives in a command or a page. Prefect is only imported on the paths that
need it (start, submit), through ``flows.engine.client``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine import client as engine
from flows.engine.gates import find_human_step, human_fields, meaning_of
from flows.engine.steps import set_run_status, write_step
from flows.errors import (
    AuthenticationError,
    NotAuthorizedError,
    RecordError,
    SopInputError,
    StepNotWaitingError,
)
from flows.record import ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.deadlines import deadline_states
from flows.record.query import run_record, stored_sop
from flows.record.state import FINAL_STATUSES, run_status, signer_problem, step_states
from flows.record.tables import Signature, SopRun, User, utcnow
from flows.record.users import roles_of
from flows.sop.catalog import Catalog
from flows.sop.inputs import coerce_values
from flows.sop.model import ProductSpec

__all__ = [
    "CorrectResult",
    "StartResult",
    "SubmitResult",
    "chain_of_identity",
    "correct_step",
    "deviations",
    "inbox",
    "list_runs",
    "preview_step",
    "quality_record",
    "start_run",
    "submit_step",
    "verify_audit",
    "wait_for_run",
]


@dataclass(frozen=True)
class StartResult:
    run_id: str
    flow_run_id: str
    sop_id: str
    sop_version: int
    sop_sha256: str


@dataclass(frozen=True)
class SubmitResult:
    run_id: str
    step_id: str
    signature_id: str
    signed_sha256: str
    resumed: bool
    computed: dict[str, Any] = field(default_factory=dict)
    """The values of the step's computed fields, as signed."""


def _catalog(settings: Settings) -> Catalog:
    return Catalog(settings.sops_dir, settings.templates_dir)


def _authenticate(settings: Settings, username: str, password: str, purpose: str) -> User:
    """Check the password and the account (active, not locked); every attempt is audited and
    repeated failures lock the account (``flows.admin.sign_in``)."""
    from flows.admin import sign_in

    return sign_in(settings, username, password, purpose)


def _refuse(settings: Settings, user: User, action: str, object_id: str, problem: str) -> NotAuthorizedError:
    with write_session(settings.database_url) as s:
        ledger.audit(
            s,
            actor=user.id,
            action=action,
            object_type="sf_run",
            object_id=object_id,
            payload={"problem": problem},
            reason=problem,
        )
    return NotAuthorizedError(problem)


def start_run(
    settings: Settings,
    institution: str,
    sop_id: str,
    raw_params: dict[str, Any],
    username: str,
    password: str,
    *,
    pinned: Any = None,
) -> StartResult:
    """Validate the parameters, record the run, pinned to the SOP's Effective version, and hand it to Prefect.

    ``pinned``: the version to run (``flows.changes.control.PinnedSop``); only change control
    passes one, to start the built-in change-control SOP, which cannot be started directly.

    Raises:
        SopNotFoundError, SopNotEffectiveError, SopDefinitionError, SopInputError, AuthenticationError,
        NotAuthorizedError, EngineError
    """
    from flows.changes.control import effective_sop
    from flows.errors import SopNotEffectiveError
    from flows.record.versions import CHANGE_CONTROL_ID

    catalog = _catalog(settings)
    if pinned is None:
        try:
            if sop_id == CHANGE_CONTROL_ID:
                raise SopNotEffectiveError(
                    f"{CHANGE_CONTROL_ID!r} is sopflow's built-in change-control SOP: it runs on a "
                    "draft, started by `sopflow sop submit`, not by `sopflow start`"
                )
            pinned = effective_sop(settings, institution, sop_id)
        except SopNotEffectiveError as exc:  # refused: audited under the user who asked
            user = _authenticate(settings, username, password, f"start {sop_id}")
            _refuse(settings, user, "run.start.refused", sop_id, str(exc))
            raise
    products = catalog.products(institution)
    sop = pinned.definition
    params = coerce_values(sop.params, raw_params, where=f"{sop_id} params", products=products)
    product = None
    if (pname := sop.product_param()) is not None and params.get(pname) is not None:
        spec = products[params[pname]]
        if spec.unconfirmed:
            raise SopInputError(
                [
                    f"{sop_id} params.{pname}: product {params[pname]!r} has values not confirmed against its label: "
                    f"{', '.join(spec.unconfirmed)}; set them in sops/{institution}/products.yaml and remove them from "
                    "'unconfirmed' before a run may use this product"
                ]
            )
        product = spec.model_dump(mode="json")
    _check_deadline_limits(sop, institution, params, product)
    init_db(settings.database_url)
    user = _authenticate(settings, username, password, f"start {sop_id}")
    with read_session(settings.database_url) as s:
        held = roles_of(s, user.id, institution)
        if not held:
            problem = f"user {username!r} holds no role at {institution!r} and may not start its runs"
        elif sop.start_roles and not set(sop.start_roles) & set(held):
            problem = (
                f"{sop_id} may only be started by role {' or '.join(map(repr, sop.start_roles))} of "
                f"{institution!r}; user {username!r} holds {', '.join(map(repr, sorted(held)))}"
            )
        else:
            problem = None
        problem = problem or _start_problem(s, sop, params)
    if problem:
        raise _refuse(settings, user, "run.start.refused", sop_id, problem)

    from flows.record.tables import new_id

    run_id = new_id()
    flow_run_id = engine.create_flow_run(settings, run_id, f"{sop_id}-{run_id[:8]}")
    try:
        with write_session(settings.database_url) as s:
            run = SopRun(
                id=run_id,
                institution=institution,
                sop_version_id=pinned.version_id,
                sop_id=sop_id,
                sop_version=sop.version,
                sop_sha256=pinned.sha256,
                schema_version=sop.schema_version,
                params_json=ledger.canonical(params).decode(),
                product_json=ledger.canonical(product).decode() if product is not None else None,
                flow_run_id=flow_run_id,
                started_by=user.id,
                started_at=utcnow(),
            )
            ledger.append(s, run, actor=user.id, action="run.start")
            set_run_status(s, run_id, "scheduled")
    except BaseException:
        engine.release_flow_run(settings, flow_run_id, cancel=True)
        raise
    engine.release_flow_run(settings, flow_run_id)
    return StartResult(run_id, flow_run_id, sop_id, sop.version, pinned.sha256)


def _check_deadline_limits(sop: Any, institution: str, params: dict[str, Any], product: dict[str, Any] | None) -> None:
    """Every ``within_min`` gives a limit for this run's product: a deadline nobody can measure is refused at start."""
    from flows.record.deadlines import limit_of
    from flows.sop.expressions import ExpressionError

    context = {"params": params, "product": product, "run": {"id": None, "sop_id": sop.id, "institution": institution}}
    problems = []
    for spec in sop.deadlines:
        try:
            limit_of(spec, context)
        except ExpressionError as exc:
            problems.append(
                f"{sop.id} deadlines.{spec.id}: no time limit for this run: {exc}; "
                f"set the value in sops/{institution}/products.yaml"
            )
    if problems:
        raise SopInputError(problems)


def _run_product(run: SopRun, sop: Any) -> tuple[str, ProductSpec] | None:
    """The run's product as it stood when the run started (``format: coi`` fields are checked against it)."""
    name = sop.product_param()
    if name is None or not run.product_json:
        return None
    return json.loads(run.params_json)[name], ProductSpec.model_validate(json.loads(run.product_json))


def _start_problem(session: Session, sop: Any, params: dict[str, Any]) -> str | None:
    """Why a run may not start on these params: its dose (COI) is quarantined by an open deviation
    (a run handling that deviation, ``deviation_id``, may). Raises SopInputError for a
    ``deviation_id`` that names no deviation, in an SOP whose steps update one."""
    from flows.record.deviations import (
        check_deviation_param,
        coi_param,
        quarantine_problem,
    )

    check_deviation_param(session, sop, params)
    coi = params.get(coi_param(sop, params) or "")
    problem = quarantine_problem(session, str(coi) if coi else None, deviation_id=params.get("deviation_id"))
    return f"{sop.id}: cannot start: {problem}" if problem else None


def deviations(settings: Settings, *, now: Any = None, include_closed: bool = False) -> dict[str, Any]:
    """Open deviations (oldest first) with their lifecycle, and every overdue CAPA action (``sopflow deviations``)."""
    from flows.record.deviations import list_deviations

    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return list_deviations(s, now, include_closed=include_closed)


def chain_of_identity(settings: Settings, coi: str) -> dict[str, Any]:
    """Every run that touched one dose (COI), in order, with sub-runs and deviations, and whether the
    chain collection → receipt → storage → infusion is unbroken (``sopflow chain``)."""
    from flows.record.chain import chain_of_identity as chain

    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return chain(s, coi)


def _find_run(session: Session, run_id: str) -> SopRun:
    run = session.get(SopRun, run_id)
    if run is None:
        # Accept a unique prefix, as printed by `sopflow runs`.
        matches = (
            list(session.exec(select(SopRun).where(col(SopRun.id).startswith(run_id)).limit(2)))
            if len(run_id) >= 6
            else []
        )
        if len(matches) != 1:
            raise StepNotWaitingError(f"no run {run_id!r}; `sopflow runs` lists them")
        run = matches[0]
    return run


def _human_step(session: Session, run_id: str, step_id: str) -> tuple[SopRun, Any, Any]:
    """The run, its pinned SOP and the human step named ``step_id`` (or a clear refusal)."""
    run = _find_run(session, run_id)
    sop = stored_sop(session, run)
    step = find_human_step(sop, step_id)
    if step is None:
        known = [st.id for st in sop.steps if st.kind in ("record", "verify", "approve")]
        raise StepNotWaitingError(
            f"run {run.id[:8]} ({sop.id}) has no human step {step_id!r}; its human steps: {', '.join(known)}"
        )
    return run, sop, step


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
    import time

    deadline = time.monotonic() + timeout
    while True:
        # Each poll reads only the run's status and its steps' newest records; the whole quality
        # record is built once, when the run is where it was asked to be.
        with read_session(settings.database_url) as s:
            _find_run(s, run_id)
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


def submit_step(
    settings: Settings,
    run_id: str,
    step_id: str,
    username: str,
    password: str,
    raw_values: dict[str, Any],
    *,
    resume: bool = True,
) -> SubmitResult:
    """Validate a signer's input, record it with their signature, and resume the flow.

    Nothing is written when the input is invalid; a refused signer is written to the audit trail.
    With ``resume=False`` only the record is written (entry while the Prefect server is away):
    the executor's sweep resumes the run once it sees the signed step.

    Raises:
        AuthenticationError, NotAuthorizedError, StepNotWaitingError, SopInputError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = _human_step(s, run_id, step_id)
        status = run_status(s, run.id)
        if status is not None and status.status in FINAL_STATUSES:
            raise StepNotWaitingError(f"run {run.id[:8]} is {status.status}: none of its steps can be signed any more")
        rec = step_states(s, run.id).get(step.id)
        if rec is None or rec.status != "waiting":
            state = rec.status if rec else "not reached yet"
            raise StepNotWaitingError(f"step {step_id!r} of run {run.id[:8]} is not waiting for input (it is {state})")
        s.expunge(run)
    data = _step_values(settings, run, sop, step, raw_values)
    if data.get("decision") == "reject" and not data.get("reason"):
        raise SopInputError([f"{sop.id} step {step_id!r}.reason: a reason is required to reject"])
    if step.updates_deviation == "capa" and data.get("owner"):  # a CAPA action's owner is an account
        with read_session(settings.database_url) as s:
            if s.exec(select(User).where(User.username == data["owner"])).first() is None:
                raise SopInputError(
                    [f"{sop.id} step {step_id!r}.owner: no user {data['owner']!r}; `sopflow user list` lists them"]
                )
    user = _authenticate(settings, username, password, f"sign {run.id}/{step_id}")
    with read_session(settings.database_url) as s:
        problem = signer_problem(s, run, sop, step, user.id)
    if problem:
        raise _refuse(settings, user, "sign.refused", run.id, f"user {username!r}: {problem}")
    late: str | None = None
    with write_session(settings.database_url) as s:
        rec = step_states(s, run.id).get(step.id)
        if rec is None or rec.status != "waiting":
            raise StepNotWaitingError(f"step {step_id!r} of run {run.id[:8]} was signed by someone else meanwhile")
        # The rules again, under the write lock: another signature may have landed since the check above.
        late = signer_problem(s, run, sop, step, user.id)
        if late is None:
            sig = Signature(
                run_id=run.id,
                step_id=step.id,
                user_id=user.id,
                printed_name=user.printed_name,
                meaning=meaning_of(step, data),
                statement=step.meaning,
                signed_at=utcnow(),
                signed_sha256="",
            )
            sig.signed_sha256 = ledger.sha256_hex(ledger.canonical(ledger.signed_content(run, step.id, data, sig)))
            ledger.append(s, sig, actor=user.id, action="signature.create")
            write_step(
                s, run.id, step.id, step.kind, "signed", data, actor=user.id, actor_id=user.id, signature_id=sig.id
            )
            sig_id, digest = sig.id, sig.signed_sha256
    if late is not None:
        raise _refuse(settings, user, "sign.refused", run.id, f"user {username!r}: {late}")
    resumed = engine.resume(settings, run.flow_run_id, step.id, sig_id) if resume else False
    return SubmitResult(run.id, step.id, sig_id, digest, resumed, _computed(step, data))


def _computed(step: Any, data: dict[str, Any]) -> dict[str, Any]:
    return {k: data.get(k) for k, f in human_fields(step).items() if f.compute is not None}


def _step_values(
    settings: Settings, run: SopRun, sop: Any, step: Any, raw_values: dict[str, Any], where: str | None = None
) -> dict[str, Any]:
    """A signer's entered values checked against the step's fields, plus its computed fields."""
    fields = human_fields(step)
    where = where or f"{sop.id} step {step.id!r}"
    data = coerce_values(fields, raw_values, where=where, product=_run_product(run, sop))
    if any(f.compute is not None for f in fields.values()):
        from flows.engine.steps import RunContext
        from flows.sop.inputs import compute_fields

        with read_session(settings.database_url) as s:
            context = RunContext(settings, run, sop, step_states(s, run.id)).expression_context()
        # A repetition <step>#<n> reads its own entries as <step>.<field>, like the step itself.
        data = compute_fields(fields, data, step_id=step.id.partition("#")[0], context=context, where=where)
    return data


def preview_step(settings: Settings, run_id: str, step_id: str, raw_values: dict[str, Any]) -> dict[str, Any]:
    """What a signer would sign, without signing: ``{"values": all values, "computed": computed fields}``.

    Shows the computed values (``compute:``) before the signer signs; writes nothing.

    Raises:
        StepNotWaitingError, SopInputError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = _human_step(s, run_id, step_id)
        s.expunge(run)
    data = _step_values(settings, run, sop, step, raw_values)
    return {"values": data, "computed": _computed(step, data)}


@dataclass(frozen=True)
class CorrectResult:
    run_id: str
    step_id: str
    record_id: str
    signature_id: str
    signed_sha256: str
    changes: dict[str, dict[str, Any]]


def correct_step(
    settings: Settings,
    run_id: str,
    step_id: str,
    username: str,
    password: str,
    raw_values: dict[str, Any],
    reason: str | None,
) -> CorrectResult:
    """Correct a done human step with a new signed entry; the entry it corrects stays in the record.

    The rules: only a human step whose newest record is ``done``; a reason; the new values pass
    the step's fields like a submission (unchanged values are refused, and an approve step's
    decision cannot be corrected: it has decided the run's course); the corrector re-authenticates
    and may sign the step (``signer_problem``) and did not verify it. Nothing is re-run. Nothing is
    written when a rule fails, except the audit event of a refused corrector.

    Raises:
        AuthenticationError, NotAuthorizedError, StepNotWaitingError, SopInputError
    """
    from flows.record.corrections import changed_fields, newest_record, write_correction
    from flows.record.state import step_data

    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = _human_step(s, run_id, step_id)
        current = newest_record(s, run.id, step.id)
        if current is None or current.status != "done":
            state = current.status if current else "not reached yet"
            raise StepNotWaitingError(
                f"step {step_id!r} of run {run.id[:8]} cannot be corrected: it is {state}; "
                "only a done step can be corrected"
            )
        s.expunge(run)
        s.expunge(current)
    where = f"{sop.id} step {step_id!r}"
    reason = (reason or "").strip()
    if not reason:
        raise SopInputError([f"{where}: a correction needs a reason (--reason): why the signed entry was wrong"])
    if not raw_values:
        raise SopInputError([f"{where}: nothing to correct: give the corrected values with --set"])
    fields = human_fields(step)
    old = step_data(current)
    entered = {k: v for k, v in old.items() if k in fields and fields[k].compute is None}
    data = _step_values(settings, run, sop, step, {**entered, **raw_values}, where)
    changes = changed_fields(old, data)
    if not changes:
        raise SopInputError([f"{where}: nothing to correct: the values given equal the current ones"])
    if "decision" in changes:
        raise SopInputError(
            [
                f"{where}.decision: a decision cannot be corrected: it has decided the run's course; "
                "open a deviation instead"
            ]
        )
    if data.get("decision") == "reject" and not data.get("reason"):
        raise SopInputError([f"{where}.reason: a reason is required to reject"])
    user = _authenticate(settings, username, password, f"correct {run.id}/{step_id}")
    with read_session(settings.database_url) as s:
        problem = signer_problem(s, run, sop, step, user.id)
        verifiers = [st.id for st in sop.steps if getattr(st, "of", None) == step.id]
        if (
            problem is None
            and verifiers
            and s.exec(
                select(Signature.id).where(
                    Signature.run_id == run.id, col(Signature.step_id).in_(verifiers), Signature.user_id == user.id
                )
            ).first()
        ):
            problem = f"you verified step {step.id!r}: its verifier may not correct it"
    if problem:
        raise _refuse(settings, user, "correct.refused", run.id, f"user {username!r}: {problem}")
    with write_session(settings.database_url) as s:
        newest = newest_record(s, run.id, step.id)
        if newest is None or newest.id != current.id:
            raise StepNotWaitingError(
                f"step {step_id!r} of run {run.id[:8]} was changed by someone else meanwhile; look again"
            )
        rec = write_correction(
            s, run, current, data, user, reason, f"Correction of an earlier signed entry; reason: {reason}"
        )
        sig = s.get(Signature, rec.signature_id)
        digest = sig.signed_sha256 if sig is not None else ""
        return CorrectResult(run.id, step.id, rec.id, str(rec.signature_id), digest, changes)


def list_runs(settings: Settings) -> list[dict[str, Any]]:
    """Every run, newest first, with its status and what it waits on."""
    from flows.engine.escalation import overdue_steps

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


def inbox(settings: Settings, username: str) -> list[dict[str, Any]]:
    """The steps waiting now on any role the user holds (oldest first)."""
    init_db(settings.database_url)
    out = []
    with read_session(settings.database_url) as s:
        user = s.exec(select(User).where(User.username == username)).first()
        if user is None:
            raise AuthenticationError(f"no user {username!r}")
        from flows.engine.escalation import overdue_steps

        overdue = {(o.run.id, o.step.id): o.due for o in overdue_steps(s)}
        for run in s.exec(select(SopRun).order_by(col(SopRun.started_at))):
            roles = roles_of(s, user.id, run.institution)
            if not roles:
                continue
            states = step_states(s, run.id)
            if not any(rec.status == "waiting" for rec in states.values()):
                continue  # finished runs, and runs between steps: nothing to show, nothing to parse
            sop = stored_sop(s, run)
            clocks: list[dict[str, Any]] | None = None
            for step_id, rec in states.items():
                step = find_human_step(sop, step_id)
                if rec.status == "waiting" and step is not None and step.role in roles:
                    if clocks is None:  # the run's deadlines still counting down (or past due): "time left"
                        clocks = [d for d in deadline_states(s, run, sop) if d["state"] in ("running", "overdue")]
                    out.append(
                        {
                            "run_id": run.id,
                            "sop_id": run.sop_id,
                            "step_id": step_id,
                            "title": step.title or step_id,
                            "role": step.role,
                            "since": rec.at,
                            "params": json.loads(run.params_json),
                            "fields": {k: f.model_dump(exclude_none=True) for k, f in human_fields(step).items()},
                            "cannot_sign": signer_problem(s, run, sop, step, user.id),
                            "overdue_since": overdue.get((run.id, step_id)),
                            "deadlines": clocks,
                            "due_at": _repetition_due(s, run.id, sop, step_id, states),
                        }
                    )
    return sorted(out, key=lambda x: x["since"])


def _repetition_due(session: Session, run_id: str, sop: Any, step_id: str, states: dict[str, Any]) -> str | None:
    """When repetition ``<step>#<n>`` is due (the previous one's signing + ``every``); None otherwise."""
    base, _, n = step_id.partition("#")
    if not n:
        return None
    from flows.record.deadlines import repetitions

    due: str | None = repetitions(session, run_id, sop.step(base), states)["next_due_at"]
    return due


def quality_record(settings: Settings, run_id: str) -> dict[str, Any]:
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return run_record(s, _find_run(s, run_id).id)


def verify_audit(settings: Settings) -> ledger.ChainReport:
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        return ledger.verify_chain(s)
