"""Stage 2: what each step kind does, as plain functions over the record (no Prefect here).

``flows.engine.run_sop`` wraps these in Prefect tasks. Each handler first looks at the record:
a run re-executes from the top after every resume, so every step must be idempotent.

    AUTOMATED    kind -> handler of each automated step kind (check, document, notify); the walk
                 (``flows.engine.run_sop.WALKS``) covers every kind of ``flows.sop.model.STEP_KINDS``
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlmodel import Session, col, select

from flows.config import Settings
from flows.engine.leases import run_key
from flows.engine.operators import emit, publish_document
from flows.engine.outbox import notify_once
from flows.errors import FlowsError
from flows.outputs.documents import render_document, render_pdf
from flows.outputs.messages import Message
from flows.outputs.messages import message as written
from flows.record import ledger
from flows.record.checkpoints import checkpoint_public, ensure_checkpoint, load_signing_key
from flows.record.db import read_session, write_session
from flows.record.documents import store_document_bytes
from flows.record.dose import run_facts
from flows.record.query import run_record
from flows.record.state import next_n, run_status, step_data, step_states
from flows.record.tables import (
    AuditEvent,
    Deviation,
    Document,
    RunEvent,
    SopRun,
    StepRecord,
    utcnow,
)
from flows.record.versions import stored_sop
from flows.sop.check import template_name
from flows.sop.expressions import ExpressionError, evaluate_check, render_message
from flows.sop.load import load_institution_file
from flows.sop.model import (
    HUMAN_KINDS,
    CheckStepSpec,
    DocumentStepSpec,
    HumanStepSpec,
    NotifyStepSpec,
    SopDefinition,
    text_in,
)

__all__ = ["AUTOMATED", "SYSTEM", "RunContext", "load_context", "send", "set_run_status", "write_step"]

SYSTEM = "system"


@dataclass
class RunContext:
    """What every step of one run needs: the run, its pinned SOP, and the data so far."""

    settings: Settings
    run: SopRun
    sop: SopDefinition
    states: dict[str, StepRecord] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.settings.database_url

    @cached_property
    def timezone(self) -> str:
        """The institution's zone for documents (UTC, said so on the page, if its file is broken now)."""
        try:
            return load_institution_file(self.settings.sops_dir / self.run.institution / "institution.yaml").timezone
        except (FlowsError, OSError):
            return "UTC"

    @cached_property
    def institution(self) -> dict[str, Any]:
        """The institution's name and language for document headers (its id if the file is broken now)."""
        try:
            spec = load_institution_file(self.settings.sops_dir / self.run.institution / "institution.yaml")
        except (FlowsError, OSError):
            return {
                "id": self.run.institution,
                "name": self.run.institution,
                "language": "en",
                "timezone": self.timezone,
            }
        return {"id": spec.id, "name": spec.name, "language": spec.language, "timezone": self.timezone}

    def refresh(self) -> None:
        with read_session(self.url) as s:
            self.states = step_states(s, self.run.id)

    def expression_context(self) -> dict[str, Any]:
        ctx: dict[str, Any] = {
            "params": json.loads(self.run.params_json),
            "product": json.loads(self.run.product_json) if self.run.product_json else None,
            "run": {"id": self.run.id, "sop_id": self.run.sop_id, "institution": self.run.institution},
        }
        for step in self.sop.steps:
            rec = self.states.get(step.id)
            if (step.kind in HUMAN_KINDS or step.kind == "subrun") and rec is not None and rec.status == "done":
                ctx[step.id] = step_data(rec)
            elif step.kind in (*HUMAN_KINDS, "subrun") and rec is not None and rec.status == "skipped":
                # A skipped step's values read as none ('when:' of a later step may test them).
                ctx[step.id] = dict.fromkeys(
                    [*getattr(step, "fields", {}), "signed_by", "decision", "status", "run_id"]
                )
            if getattr(step, "repeat", None) is not None:
                # <step> is the latest repetition, <step>_all every one of them, in order.
                reps = self.repetitions(step.id)
                ctx[f"{step.id}_all"] = [step_data(r) for r in reps]
                if reps:
                    ctx[step.id] = step_data(reps[-1])
        return ctx

    def repetitions(self, step_id: str) -> list[StepRecord]:
        """The done repetitions ``<step>#<n>`` of a repeated step, by n."""
        reps = [
            (int(k.partition("#")[2]), r)
            for k, r in self.states.items()
            if k.startswith(f"{step_id}#") and r.status == "done"
        ]
        return [r for _, r in sorted(reps, key=lambda x: x[0])]


def load_context(settings: Settings, run_id: str, wait: float = 10.0) -> RunContext:
    """Load a run; waits briefly for a run whose record is still being committed by ``start``."""
    deadline = time.monotonic() + wait
    while True:
        with read_session(settings.database_url) as s:
            run = s.get(SopRun, run_id)
            if run is not None:
                ctx = RunContext(settings, run, stored_sop(s, run), step_states(s, run_id))
                s.expunge(run)
                return ctx
        if time.monotonic() > deadline:
            raise LookupError(f"sopflow has no record of run {run_id}")
        time.sleep(0.05)


def write_step(
    session: Session,
    run_id: str,
    step_id: str,
    kind: str,
    status: str,
    data: dict[str, Any],
    *,
    actor: str = SYSTEM,
    actor_id: str | None = None,
    signature_id: str | None = None,
    reason: str | None = None,
    task_run_id: str | None = None,
) -> StepRecord:
    rec = StepRecord(
        run_id=run_id,
        n=next_n(session, StepRecord, run_id),
        step_id=step_id,
        kind=kind,
        status=status,
        data_json=ledger.canonical(data).decode(),
        actor_id=actor_id,
        signature_id=signature_id,
        reason=reason,
        task_run_id=task_run_id,
        at=utcnow(),
    )
    ledger.append(session, rec, actor=actor, action=f"step.{status}")
    return rec


def set_run_status(session: Session, run_id: str, status: str, detail: str | None = None) -> None:
    """Append a RunEvent unless the run already has this status."""
    current = run_status(session, run_id)
    if current is not None and current.status == status and current.detail == detail:
        return
    ev = RunEvent(run_id=run_id, n=next_n(session, RunEvent, run_id), status=status, detail=detail, at=utcnow())
    ledger.append(session, ev, actor=SYSTEM, action=f"run.{status}")


def run_when(ctx: RunContext, step: Any) -> tuple[bool, str | None]:
    """Whether the walk runs ``step`` now: ``(True, None)`` without ``when:`` or when it holds;
    ``(False, None)`` after recording the step ``skipped``; ``(True, problem)`` when the condition
    cannot be evaluated (the step then runs: skipping a step nobody chose to skip is the worse error)."""
    if step.when is None:
        return True, None
    try:
        holds = evaluate_check(step.when, ctx.expression_context())
    except ExpressionError as exc:
        return True, str(exc)
    if not holds:
        with write_session(ctx.url) as s:
            if step_states(s, ctx.run.id).get(step.id) is None:
                write_step(
                    s,
                    ctx.run.id,
                    step.id,
                    step.kind,
                    "skipped",
                    {"when": step.when, "value": False},
                    reason=f"'when' is false: {step.when}",
                )
    return holds, None


def run_check(ctx: RunContext, step: CheckStepSpec, task_run_id: str | None) -> bool:
    """Evaluate an acceptance expression; on failure open a deviation. Returns whether it passed."""
    try:
        passed = evaluate_check(step.expect, ctx.expression_context())
        detail = "passed" if passed else "the expression is false"
    except ExpressionError as exc:
        passed, detail = False, f"could not be evaluated: {exc}"
    data = {"expect": step.expect, "passed": passed, "detail": detail}
    with write_session(ctx.url) as s:
        write_step(s, ctx.run.id, step.id, "check", "done" if passed else "failed", data, task_run_id=task_run_id)
        if not passed:
            dev = Deviation(
                run_id=ctx.run.id,
                step_id=step.id,
                classification=step.deviation.classification,
                description=step.deviation.description or f"check {step.id!r} failed: {step.expect}",
                quarantine=step.deviation.quarantine,
                opened_at=utcnow(),
            )
            ledger.append(s, dev, actor=SYSTEM, action="deviation.open")
            opened = {"deviation_id": dev.id, "step_id": step.id, "classification": dev.classification}
    if not passed:
        emit("sopflow.deviation.opened", ctx.run, {**opened, "quarantine": step.deviation.quarantine})
    return passed


def document_context(
    ctx: RunContext, step: DocumentStepSpec, record: dict[str, Any], audit_head: dict[str, Any] | None
) -> dict[str, Any]:
    """What a document template sees: the record, the step, the institution, the SOP's field
    types/labels/units, and ``document`` (the record's sha256, the audit chain head and, set by
    ``run_document``, the signed checkpoint that covers it)."""
    language = step.language or ctx.institution["language"]
    fields: dict[str, dict[str, Any]] = {}
    for st in ctx.sop.steps:
        if isinstance(st, HumanStepSpec):
            fields[st.id] = {k: {"type": f.type, "label": f.label or k, "unit": f.unit} for k, f in st.fields.items()}
    return {
        "record": record,
        "step": {"id": step.id, "title": step.title or step.id},
        "institution": ctx.institution,
        "sop": {
            "params": {k: {"type": f.type, "label": f.label or k, "unit": f.unit} for k, f in ctx.sop.params.items()},
            "fields": fields,
        },
        "document": {
            "language": language,
            "record_sha256": ledger.sha256_hex(ledger.canonical(record)),
            "audit_head": audit_head,
            "checkpoint": None,
        },
    }


def document_now(ctx: RunContext, step: DocumentStepSpec) -> dict[str, Any]:
    """``document_context`` of the record as it stands, with the signed checkpoint of the chain's
    head (made now unless one covers it), read under the write lock so the checkpoint covers exactly
    the head the document prints.

    Raises:
        ConfigError: the checkpoint key file cannot be used.
    """
    key = load_signing_key(ctx.settings)
    with write_session(ctx.url) as s:
        cp = ensure_checkpoint(s, key)
        record = run_record(s, ctx.run.id, with_history=False)
        head = s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
        audit_head = {"seq": head.seq, "hash": head.hash} if head else None
        checkpoint = checkpoint_public(cp, key.public) if cp else None
    context = document_context(ctx, step, record, audit_head)
    context["document"]["checkpoint"] = checkpoint
    return context


def run_document(ctx: RunContext, step: DocumentStepSpec, task_run_id: str | None) -> None:
    """Render the HTML (and, unless ``pdf: false``, its PDF) and store both with their sha256.

    The document cannot carry its own hash; its footer carries the sha256 of the record content it
    was rendered from (canonical JSON) and the audit chain head at rendering. The stored rows carry
    the sha256 of each file.
    """
    context = document_now(ctx, step)
    language = context["document"]["language"]
    name = template_name(step.template, ctx.settings.templates_dir, ctx.run.institution, language) or step.template
    text, digest = render_document(ctx.settings.templates_dir, ctx.run.institution, ctx.timezone, name, context)
    # The bytes go to the database (flows.record.documents), which every web node and worker reaches;
    # the path is the document's name within its run, the same on every machine.
    stem = name.removesuffix(".j2")
    path = f"{ctx.run.id}/{step.id}-{digest[:12]}-{stem}"
    pdf_path, pdf_digest, pdf = None, None, b""
    if step.pdf:
        pdf = render_pdf(text, ctx.settings.templates_dir)
        pdf_digest = ledger.sha256_hex(pdf)
        pdf_path = f"{ctx.run.id}/{step.id}-{digest[:12]}-{stem.removesuffix('.html')}.pdf"
    with write_session(ctx.url) as s:
        store_document_bytes(s, text.encode("utf-8"))
        doc = Document(
            run_id=ctx.run.id, step_id=step.id, template=name, path=path, sha256=digest, rendered_at=utcnow()
        )
        ledger.append(s, doc, actor=SYSTEM, action="document.render")
        published = [(doc.id, str(path), digest)]
        data: dict[str, Any] = {
            "document_id": doc.id,
            "sha256": digest,
            "path": path,
            "record_sha256": context["document"]["record_sha256"],
        }
        if pdf_path is not None and pdf_digest is not None:
            store_document_bytes(s, pdf)
            pdf_doc = Document(
                run_id=ctx.run.id,
                step_id=step.id,
                template=name,
                path=pdf_path,
                sha256=pdf_digest,
                rendered_at=utcnow(),
            )
            ledger.append(s, pdf_doc, actor=SYSTEM, action="document.render")
            data.update({"pdf_document_id": pdf_doc.id, "pdf_sha256": pdf_digest, "pdf_path": pdf_path})
            published.append((pdf_doc.id, pdf_path, pdf_digest))
        write_step(s, ctx.run.id, step.id, "document", "done", data, task_run_id=task_run_id)
    for doc_id, doc_path, doc_sha in published:
        publish_document(ctx.run, step.id, doc_id, doc_path, doc_sha)


def send(
    ctx: RunContext, roles: tuple[str, ...] | list[str], title: str, body: str | Message, *, key: str
) -> list[dict[str, Any]]:
    """Record the message under ``key`` (the outbox), then deliver it to every channel of the roles,
    retrying failures; never raises for a failed delivery (``flows.engine.outbox``).

    Raises:
        ConfigError: the notification channels file is broken (the message stays queued).
    """
    return notify_once(
        ctx.settings,
        key=key,
        institution=ctx.run.institution,
        roles=roles,
        title=title,
        body=body,
        lease=run_key(ctx.run.flow_run_id),
        run_id=ctx.run.id,
    )


def run_notify(ctx: RunContext, step: NotifyStepSpec, task_run_id: str | None) -> None:
    try:
        message = render_message(step.message, ctx.expression_context())
    except ExpressionError as exc:
        message = f"(message could not be rendered: {exc})"
    facts = run_facts(ctx.settings, ctx.run, ctx.sop)
    said = written("notify", facts, step=text_in(step.title, facts.language) or step.id, text=message)
    deliveries = send(ctx, step.to, said.title, said, key=f"notify:{ctx.run.id}:{step.id}")
    with write_session(ctx.url) as s:
        write_step(
            s,
            ctx.run.id,
            step.id,
            "notify",
            "done",
            {"message": message, "to": list(step.to), "deliveries": deliveries},
            task_run_id=task_run_id,
        )


AUTOMATED: dict[str, Any] = {"check": run_check, "document": run_document, "notify": run_notify}
"""The handler of each automated step kind; ``flows.engine.run_sop`` runs them as Prefect tasks."""
