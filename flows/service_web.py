"""The service layer, continued: what the web app needed first (the CLI may call these too).

Same rules as ``flows.service``: views parse input, call one of these and format the result;
no business rule lives in a page. Kept in its own module so that changes to ``flows.service``
by other work merge cleanly.

- ``step_form`` / ``preview_step`` / ``sign_reviewed``: a step's fields, what the signer is about
  to sign (the values exactly as they will be stored, the meaning, the SOP's statement), and the
  signature itself, refused when the values differ from the ones the signer was shown.
- ``urgent_inbox``: ``service.inbox`` ordered overdue first, then by time left, then oldest.
- ``document_file``: a rendered document's bytes, with its sha256 re-checked against the record.
- SOPs (what may be started, the library, one SOP readably): ``flows.library``.
- ``set_language`` / ``language_of``: a user's language, an append-only ``UserEvent``.
- ``web_sign_in`` / ``sign_out``: session sign-in (audited, lockout applies) and sign-out (audited).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from flows import service
from flows.config import Settings
from flows.errors import (
    NotAuthorizedError,
    RecordError,
    SopDefinitionError,
    SopInputError,
    StepNotWaitingError,
)
from flows.record import accounts, ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.tables import Document, User, UserEvent, utcnow

__all__ = [
    "LANGUAGES",
    "document_file",
    "institution_timezone",
    "language_of",
    "preview_step",
    "record_for",
    "runs_for",
    "set_language",
    "sign_out",
    "sign_reviewed",
    "step_form",
    "urgent_inbox",
    "user_summary",
    "web_sign_in",
]

LANGUAGES = ("en", "zh")
"""The languages pages (and, where templates exist, documents) come in: English, Simplified Chinese."""


def institution_timezone(settings: Settings, institution: str) -> str:
    """The institution's time zone (UTC when its file cannot be read: pages say which zone they show)."""
    from flows.sop.load import load_institution_file

    try:
        return load_institution_file(settings.sops_dir / institution / "institution.yaml").timezone
    except (OSError, SopDefinitionError):
        return "UTC"


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; sopflow stores UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _field_view(name: str, spec: Any) -> dict[str, Any]:
    """A field as a form renders it: every key the SOP gave (new keys pass through untouched)."""
    return {"name": name, **spec.model_dump(exclude_none=True, mode="json")}


# -- accounts ----------------------------------------------------------------------------------------
def web_sign_in(settings: Settings, username: str, password: str) -> User:
    """Sign in for a web session: ``admin.sign_in`` (audited; failures count towards the lock).

    Raises:
        AuthenticationError
    """
    from flows.admin import sign_in

    return sign_in(settings, username, password, "web session")


def sign_out(settings: Settings, username: str, why: str) -> None:
    """Audit the end of a web session: ``logout`` or ``idle`` (the idle timeout ended it)."""
    with write_session(settings.database_url) as s:
        ledger.audit(
            s,
            actor=username,
            action=f"auth.{why}",
            object_type="sf_user",
            object_id=username,
            payload={"session": "web"},
        )


def user_summary(settings: Settings, username: str) -> dict[str, Any]:
    """Printed name and roles per institution. Raises RecordError for an unknown user."""
    from flows.record.tables import RoleGrant
    from flows.record.users import find_user

    with read_session(settings.database_url) as s:
        user = find_user(s, username)
        if user is None:
            raise RecordError(f"no user {username!r}")
        grants = sorted((g.institution, g.role) for g in s.exec(select(RoleGrant).where(RoleGrant.user_id == user.id)))
    roles: dict[str, list[str]] = {}
    for inst, role in grants:
        roles.setdefault(inst, []).append(role)
    return {"username": username, "printed_name": user.printed_name, "roles": roles}


def set_language(settings: Settings, username: str, language: str) -> None:
    """Record the user's language (``en`` or ``zh``) as an append-only account event.

    Raises:
        SopInputError: not a language sopflow has. RecordError: unknown user.
    """
    if language not in LANGUAGES:
        raise SopInputError([f"language {language!r}: expected one of {', '.join(LANGUAGES)}"])
    init_db(settings.database_url)
    with write_session(settings.database_url) as s:
        user = s.exec(select(User).where(User.username == username)).first()
        if user is None:
            raise RecordError(f"no user {username!r}")
        if language_of_user(s, user.id) == language:
            return
        accounts.append_event(s, user, "language", actor=user.id, data={"language": language})


def language_of_user(session: Any, user_id: str) -> str | None:
    ev = session.exec(
        select(UserEvent)
        .where(UserEvent.user_id == user_id, UserEvent.kind == "language")
        .order_by(col(UserEvent.n).desc())
        .limit(1)
    ).first()
    return json.loads(ev.data_json).get("language") if ev else None


def language_of(settings: Settings, username: str) -> str | None:
    """The user's chosen language, or None when they never chose one."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = s.exec(select(User).where(User.username == username)).first()
        return language_of_user(s, user.id) if user else None


# -- inbox ---------------------------------------------------------------------------------------------
def urgent_inbox(settings: Settings, username: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """``service.inbox`` with ``due_at`` and ``seconds_left`` (negative: overdue), most urgent first:
    overdue steps, then steps with a deadline by time left, then the rest oldest first."""
    from flows.engine.gates import find_human_step
    from flows.record.query import stored_sop
    from flows.record.tables import SopRun

    now = now or utcnow()
    items = service.inbox(settings, username)
    zones: dict[str, str] = {}
    with read_session(settings.database_url) as s:
        for it in items:
            it["since"] = _aware(it["since"])
            if it.get("overdue_since"):
                it["overdue_since"] = _aware(it["overdue_since"])
            run = s.get(SopRun, it["run_id"])
            due = it.get("due_at")
            if due is None and run is not None:
                step = find_human_step(stored_sop(s, run), it["step_id"])
                timeout = getattr(step, "timeout", None)
                due = it["since"] + timeout if isinstance(timeout, timedelta) else None
            if isinstance(due, str):
                due = datetime.fromisoformat(due)
            due = _aware(due) if due is not None else None
            # The run's SOP deadlines still counting down (thaw to end of infusion…): each shown as
            # time left, and the nearest one ranks the step too.
            it["clocks"] = []
            for clock in it.get("deadlines") or []:
                if not clock.get("due_at"):
                    continue
                at = _aware(
                    datetime.fromisoformat(clock["due_at"]) if isinstance(clock["due_at"], str) else clock["due_at"]
                )
                it["clocks"].append({"title": clock["title"], "due_at": at, "seconds_left": (at - now).total_seconds()})
                due = at if due is None or at < due else due
            it["due_at"] = due
            it["seconds_left"] = (due - now).total_seconds() if due is not None else None
            it["institution"] = run.institution if run else None
            if run is not None and run.institution not in zones:
                zones[run.institution] = institution_timezone(settings, run.institution)
            it["timezone"] = zones.get(run.institution, "UTC") if run else "UTC"

    def urgency(it: dict[str, Any]) -> tuple[int, float, datetime]:
        left = it["seconds_left"]
        rank = 0 if (left is not None and left < 0) or it.get("overdue_since") else 1 if left is not None else 2
        return rank, left if left is not None else 0.0, it["since"]

    return sorted(items, key=urgency)


# -- step forms and signing -------------------------------------------------------------------------
def step_form(settings: Settings, run_id: str, step_id: str, username: str) -> dict[str, Any]:
    """What a step's form shows: the run, the step, its fields, whether it waits, whether this user
    may sign it (and why not), and for a verify step the data it verifies.

    Raises:
        StepNotWaitingError: no such run or human step. NotAuthorizedError: no role at the run's institution.
    """
    from flows.engine.gates import human_fields
    from flows.record.query import run_record
    from flows.record.state import run_status, signer_problem, step_states

    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        run, sop, step = service._human_step(s, run_id, step_id)
        institution = run.institution
    if problem := _reader_problem(settings, username, institution):
        raise NotAuthorizedError(problem)
    with read_session(settings.database_url) as s:
        run, sop, step = service._human_step(s, run_id, step_id)
        user = s.exec(select(User).where(User.username == username)).first()
        rec = step_states(s, run.id).get(step.id)
        status = run_status(s, run.id)
        problem = signer_problem(s, run, sop, step, user.id) if user else f"no user {username!r}"
        record = run_record(s, run.id, with_history=False)
    verifies = None
    if getattr(step, "of", None):
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
        "fields": [_field_view(n, f) for n, f in human_fields(step).items()],
        "status": rec.status if rec else "not reached",
        "run_status": status.status if status else "unknown",
        "cannot_sign": problem,
        "verifies": verifies,
        "timezone": institution_timezone(settings, run.institution),
    }


def preview_step(
    settings: Settings, run_id: str, step_id: str, username: str, raw_values: dict[str, Any]
) -> dict[str, Any]:
    """What the signer would sign: the values exactly as they would be stored (with labels and
    units), the signature's meaning and the SOP's statement, and ``data_sha256`` of those values.
    Writes nothing.

    Raises:
        SopInputError (every problem at once), StepNotWaitingError
    """
    from flows.engine.gates import human_fields, meaning_of

    form = step_form(settings, run_id, step_id, username)
    if form["status"] != "waiting":
        raise StepNotWaitingError(
            f"step {step_id!r} of run {form['run']['id'][:8]} is not waiting for input (it is {form['status']})"
        )
    with read_session(settings.database_url) as s:
        _, sop, step = service._human_step(s, run_id, step_id)
    fields = human_fields(step)
    # The service's own preview: computed fields and identifier formats, exactly as submit stores them.
    data = service.preview_step(settings, run_id, step_id, raw_values)["values"]
    if data.get("decision") == "reject" and not data.get("reason"):
        raise SopInputError([f"{sop.id} step {step_id!r}.reason: a reason is required to reject"])
    with read_session(settings.database_url) as s:
        user = s.exec(select(User).where(User.username == username)).first()
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
) -> service.SubmitResult:
    """Sign what the signer was shown: refused, writing nothing, when the values as they would be
    stored now differ from the ones previewed (``shown_sha256``); else ``service.submit_step``.

    Raises:
        SopInputError, StepNotWaitingError, AuthenticationError, NotAuthorizedError
    """
    preview = preview_step(settings, run_id, step_id, username, raw_values)
    if preview["data_sha256"] != shown_sha256:
        raise SopInputError(
            [f"step {step_id!r}: the values differ from the ones you reviewed; review them again before signing"]
        )
    return service.submit_step(settings, run_id, step_id, username, password, raw_values)


# -- runs --------------------------------------------------------------------------------------------
def _reader_problem(settings: Settings, username: str, institution: str) -> str | None:
    if institution in user_summary(settings, username)["roles"]:
        return None
    return f"user {username!r} holds no role at {institution!r} and may not read its runs or documents"


def runs_for(settings: Settings, username: str) -> list[dict[str, Any]]:
    """``service.list_runs``, only the runs of institutions where the user holds a role."""
    mine = user_summary(settings, username)["roles"]
    return [r for r in service.list_runs(settings) if r["institution"] in mine]


def record_for(settings: Settings, username: str, run_id: str) -> dict[str, Any]:
    """``service.quality_record`` for a user with a role at the run's institution.

    Raises:
        StepNotWaitingError (no such run), NotAuthorizedError
    """
    rec = service.quality_record(settings, run_id)
    if problem := _reader_problem(settings, username, rec["run"]["institution"]):
        raise NotAuthorizedError(problem)
    return rec


def document_file(settings: Settings, document_id: str, username: str) -> dict[str, Any]:
    """A rendered document: its record, its bytes, their media type, and whether the bytes still
    have the sha256 the record holds (``intact``).

    Raises:
        RecordError: no such document, or its file is gone. NotAuthorizedError: no role at the run's institution.
    """
    from flows.record.tables import SopRun

    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        doc = s.get(Document, document_id)
        if doc is None:
            raise RecordError(f"no document {document_id!r}")
        run = s.get(SopRun, doc.run_id)
        institution = run.institution if run else ""
        s.expunge(doc)
    if problem := _reader_problem(settings, username, institution):
        raise NotAuthorizedError(problem)
    path = Path(doc.path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"document {document_id!r}: its file {path.name} cannot be read ({exc.strerror})") from None
    media = {".pdf": "application/pdf", ".html": "text/html", ".htm": "text/html"}.get(
        path.suffix.lower(), "text/plain"
    )
    return {
        "id": doc.id,
        "run_id": doc.run_id,
        "step_id": doc.step_id,
        "template": doc.template,
        "name": path.name,
        "sha256": doc.sha256,
        "rendered_at": doc.rendered_at,
        "content": content,
        "media_type": media,
        "intact": ledger.sha256_hex(content) == doc.sha256,
    }


# -- SOPs --------------------------------------------------------------------------------------------
