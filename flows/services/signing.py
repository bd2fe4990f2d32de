"""The service floor: entering data and signing it. A step's form, what the signer is about to
sign, the signature itself, and corrections of a signed entry.

``submit_step`` re-authenticates the signer (argon2), asks ``guard.signer_problem`` (role,
training on the run's version, separation of duties), writes the data and a ``Signature``
(printed name, UTC time, meaning, sha256 of exactly what was signed) in one transaction, and
resumes the flow with only the signature's id; the flow checks it again before it goes on.
``review_step`` / ``sign_reviewed`` (the web's dialog) refuse a signature whose values differ
from the ones the signer was shown. ``correct_step`` appends a corrected, re-signed entry; the
entry it corrects stays. Nothing is written when input is invalid; a refused signer is audited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from flows.config import Settings
from flows.engine import client as engine
from flows.engine.gates import find_human_step, human_fields, meaning_of
from flows.engine.steps import RunContext, write_step
from flows.errors import SopInputError, StepNotWaitingError
from flows.record import ledger
from flows.record.corrections import changed_fields, newest_record, write_correction
from flows.record.db import init_db, read_session, write_session
from flows.record.query import run_record
from flows.record.state import FINAL_STATUSES, run_status, step_data, step_states
from flows.record.tables import Signature, SopRun, utcnow
from flows.record.users import find_user
from flows.record.versions import stored_sop
from flows.services import guard
from flows.services.library import field_view, institution_timezone
from flows.services.runs import find_run
from flows.sop.inputs import coerce_values, compute_fields
from flows.sop.model import HUMAN_KINDS, HumanStepSpec, ProductSpec, SopDefinition, VerifyStepSpec

__all__ = [
    "CorrectResult",
    "SubmitResult",
    "correct_step",
    "human_step",
    "preview_step",
    "review_step",
    "sign_reviewed",
    "step_form",
    "submit_step",
]


@dataclass(frozen=True)
class SubmitResult:
    run_id: str
    step_id: str
    signature_id: str
    signed_sha256: str
    resumed: bool
    computed: dict[str, Any] = field(default_factory=dict)
    """The values of the step's computed fields, as signed."""


@dataclass(frozen=True)
class CorrectResult:
    run_id: str
    step_id: str
    record_id: str
    signature_id: str
    signed_sha256: str
    changes: dict[str, dict[str, Any]]


def human_step(session: Session, run_id: str, step_id: str) -> tuple[SopRun, SopDefinition, HumanStepSpec]:
    """The run, its pinned SOP and the human step named ``step_id`` (or a clear refusal).

    Raises:
        NotFoundError (no such run), StepNotWaitingError (no such human step)
    """
    run = find_run(session, run_id)
    sop = stored_sop(session, run)
    step = find_human_step(sop, step_id)
    if step is None:
        known = [st.id for st in sop.steps if st.kind in HUMAN_KINDS]
        raise StepNotWaitingError(
            f"run {run.id[:8]} ({sop.id}) has no human step {step_id!r}; its human steps: {', '.join(known)}"
        )
    return run, sop, step


def _run_product(run: SopRun, sop: SopDefinition) -> tuple[str, ProductSpec] | None:
    """The run's product as it stood when the run started (``format: coi`` fields are checked against it)."""
    name = sop.product_param()
    if name is None or not run.product_json:
        return None
    return json.loads(run.params_json)[name], ProductSpec.model_validate_json(run.product_json)


def _computed(step: HumanStepSpec, data: dict[str, Any]) -> dict[str, Any]:
    return {k: data.get(k) for k, f in human_fields(step).items() if f.compute is not None}


def _step_values(
    settings: Settings,
    run: SopRun,
    sop: SopDefinition,
    step: HumanStepSpec,
    raw_values: dict[str, Any],
    where: str | None = None,
) -> dict[str, Any]:
    """A signer's entered values checked against the step's fields, plus its computed fields."""
    fields = human_fields(step)
    where = where or f"{sop.id} step {step.id!r}"
    data = coerce_values(
        fields,
        raw_values,
        where=where,
        product=_run_product(run, sop),
        now=utcnow(),
        not_before=run.started_at,
        future_skew=timedelta(minutes=settings.future_skew_minutes),
    )
    if any(f.compute is not None or f.required_when is not None for f in fields.values()):
        with read_session(settings.database_url) as s:
            context = RunContext(settings, run, sop, step_states(s, run.id)).expression_context()
        # A repetition <step>#<n> reads its own entries as <step>.<field>, like the step itself.
        data = compute_fields(fields, data, step_id=step.id.partition("#")[0], context=context, where=where)
    return data


def _require_reason_to_reject(sop: SopDefinition, step_id: str, data: dict[str, Any]) -> None:
    if data.get("decision") == "reject" and not data.get("reason"):
        raise SopInputError([f"{sop.id} step {step_id!r}.reason: a reason is required to reject"])


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

    With ``resume=False`` only the record is written (entry while the Prefect server is away):
    the executor's sweep resumes the run once it sees the signed step.

    Raises:
        AuthenticationError, NotAuthorizedError, NotFoundError, StepNotWaitingError, SopInputError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = human_step(s, run_id, step_id)
        status = run_status(s, run.id)
        if status is not None and status.status in FINAL_STATUSES:
            raise StepNotWaitingError(f"run {run.id[:8]} is {status.status}: none of its steps can be signed any more")
        rec = step_states(s, run.id).get(step.id)
        if rec is None or rec.status != "waiting":
            state = rec.status if rec else "not reached yet"
            raise StepNotWaitingError(f"step {step_id!r} of run {run.id[:8]} is not waiting for input (it is {state})")
        s.expunge(run)
    data = _step_values(settings, run, sop, step, raw_values)
    _require_reason_to_reject(sop, step_id, data)
    if step.updates_deviation == "capa" and data.get("owner"):  # a CAPA action's owner is an account
        with read_session(settings.database_url) as s:
            if find_user(s, data["owner"]) is None:
                raise SopInputError(
                    [f"{sop.id} step {step_id!r}.owner: no user {data['owner']!r}; `sopflow user list` lists them"]
                )
    user = guard.sign_in(settings, username, password, f"sign {run.id}/{step_id}")
    with read_session(settings.database_url) as s:
        problem = guard.signer_problem(s, run, sop, step, user.id)
    if problem:
        raise guard.refuse(settings, user.id, "sign", "sf_run", run.id, f"user {username!r}: {problem}")
    with write_session(settings.database_url) as s:
        rec = step_states(s, run.id).get(step.id)
        if rec is None or rec.status != "waiting":
            raise StepNotWaitingError(f"step {step_id!r} of run {run.id[:8]} was signed by someone else meanwhile")
        # The rules again, under the write lock: another signature may have landed since the check above.
        late = guard.signer_problem(s, run, sop, step, user.id)
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
        raise guard.refuse(settings, user.id, "sign", "sf_run", run.id, f"user {username!r}: {late}")
    resumed = engine.resume(settings, run.flow_run_id, step.id, sig_id) if resume else False
    return SubmitResult(run.id, step.id, sig_id, digest, resumed, _computed(step, data))


def preview_step(settings: Settings, run_id: str, step_id: str, raw_values: dict[str, Any]) -> dict[str, Any]:
    """What a signer would sign, without signing: ``{"values": all values, "computed": computed fields}``.

    Raises:
        NotFoundError, StepNotWaitingError, SopInputError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = human_step(s, run_id, step_id)
        s.expunge(run)
    data = _step_values(settings, run, sop, step, raw_values)
    return {"values": data, "computed": _computed(step, data)}


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
    and passes ``guard.corrector_problem``. Nothing is re-run. Nothing is written when a rule fails,
    except the audit event of a refused corrector.

    Raises:
        AuthenticationError, NotAuthorizedError, NotFoundError, StepNotWaitingError, SopInputError
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = human_step(s, run_id, step_id)
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
                f"{where}.decision: a decision cannot be corrected: it has decided the run's course; open a deviation instead"
            ]
        )
    _require_reason_to_reject(sop, step_id, data)
    user = guard.sign_in(settings, username, password, f"correct {run.id}/{step_id}")
    with read_session(settings.database_url) as s:
        problem = guard.corrector_problem(s, run, sop, step, user.id)
    if problem:
        raise guard.refuse(settings, user.id, "correct", "sf_run", run.id, f"user {username!r}: {problem}")
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


# -- the web's signing dialog -------------------------------------------------------------------------
def step_form(settings: Settings, run_id: str, step_id: str, username: str) -> dict[str, Any]:
    """What a step's form shows: the run, the step, its fields, whether it waits, whether this user
    may sign it (and why not), and for a verify step the data it verifies.

    Raises:
        NotFoundError: ``guard.NO_SUCH_RUN``, no such run or one of an institution where the user holds no role.
        StepNotWaitingError: no such human step.
    """
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        guard.readable_run(s, username, run_id)  # before the step: a non-reader learns nothing of the run
        run, sop, step = human_step(s, run_id, step_id)
        user = find_user(s, username)
        rec = step_states(s, run.id).get(step.id)
        status = run_status(s, run.id)
        cannot = guard.signer_problem(s, run, sop, step, user.id) if user else f"no user {username!r}"
        record = run_record(s, run.id, with_history=False)
    verifies = None
    if isinstance(step, VerifyStepSpec):
        verifies = next((st for st in record["steps"] if st["id"] == step.of), None)
    return {
        "run": record["run"],
        "step": {
            "id": step.id,
            "kind": step.kind,
            "title": step.title or step.id,
            "role": step.role,
            "meaning": step.meaning,
            "description": step.description,
        },
        "fields": [field_view(n, f) for n, f in human_fields(step).items()],
        "status": rec.status if rec else "not reached",
        "run_status": status.status if status else "unknown",
        "cannot_sign": cannot,
        "verifies": verifies,
        "timezone": institution_timezone(settings, run.institution),
    }


def review_step(
    settings: Settings, run_id: str, step_id: str, username: str, raw_values: dict[str, Any]
) -> dict[str, Any]:
    """What the signer would sign: the values exactly as they would be stored (with labels and
    units), the signature's meaning and the SOP's statement, and ``data_sha256`` of those values.
    Writes nothing.

    Raises:
        SopInputError (every problem at once), StepNotWaitingError, NotFoundError, NotAuthorizedError
    """
    form = step_form(settings, run_id, step_id, username)
    if form["status"] != "waiting":
        raise StepNotWaitingError(
            f"step {step_id!r} of run {form['run']['id'][:8]} is not waiting for input (it is {form['status']})"
        )
    with read_session(settings.database_url) as s:
        _, sop, step = human_step(s, run_id, step_id)
        user = find_user(s, username)
    fields = human_fields(step)
    # The service's own preview: computed fields and identifier formats, exactly as submit stores them.
    data = preview_step(settings, run_id, step_id, raw_values)["values"]
    _require_reason_to_reject(sop, step_id, data)
    return {
        **form,
        "values": [
            {
                "name": n,
                "label": f.label or n,
                "unit": f.unit,
                "value": data.get(n),
                "computed": f.compute is not None,
                "type": f.type,
            }
            for n, f in fields.items()
        ],
        "data": data,
        "data_sha256": ledger.sha256_hex(ledger.canonical(data)),
        "meaning": meaning_of(step, data),
        "statement": step.meaning,
        "signer": user.printed_name if user else username,
    }


def sign_reviewed(
    settings: Settings,
    run_id: str,
    step_id: str,
    username: str,
    password: str,
    raw_values: dict[str, Any],
    shown_sha256: str,
) -> SubmitResult:
    """Sign what the signer was shown: refused, writing nothing, when the values as they would be
    stored now differ from the ones reviewed (``shown_sha256``); else ``submit_step``.

    Raises:
        SopInputError, StepNotWaitingError, AuthenticationError, NotAuthorizedError, NotFoundError
    """
    review = review_step(settings, run_id, step_id, username, raw_values)
    if review["data_sha256"] != shown_sha256:
        raise SopInputError(
            [f"step {step_id!r}: the values differ from the ones you reviewed; review them again before signing"]
        )
    return submit_step(settings, run_id, step_id, username, password, raw_values)
