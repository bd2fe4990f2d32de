"""Stage 3 of the data path: the quality record's tables (SQLModel, ``table=True``).

Records are append-only: nothing here is updated in place or deleted by sopflow. The state of
a run or a step is the newest row about it (``RunEvent``, ``StepRecord``); a correction is a new
``StepRecord`` that names the one it supersedes and a reason. Every row is written together with
an ``AuditEvent`` that carries the row's content, and each audit event carries the hash of the
one before it, so ``audit verify`` finds an edited, deleted, inserted or reordered row.

Only ``flows.record.ledger`` writes these tables. Must not import prefect.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, overload
from uuid import uuid4

from sqlalchemy import Column, DateTime, Dialect, Float, Index, LargeBinary, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel, func, select

__all__ = [
    "CURRENT_TABLES",
    "RECORD_TABLES",
    "AdminKey",
    "ApiToken",
    "ApiTokenRevocation",
    "AuditCheckpoint",
    "AuditEvent",
    "CurrentQuarantine",
    "CurrentRun",
    "CurrentStep",
    "Deviation",
    "DeviationEvent",
    "Document",
    "DocumentContent",
    "Escalation",
    "InstitutionSetup",
    "OutboxDelivery",
    "OutboxMessage",
    "Reminder",
    "RoleGrant",
    "RoleRevocation",
    "RunEvent",
    "SignInThrottle",
    "Signature",
    "SopRun",
    "SopVersion",
    "SopVersionEvent",
    "StepRecord",
    "TrainingAssignment",
    "TrainingRecord",
    "UTCDateTime",
    "User",
    "UserEvent",
    "WebSession",
    "iso_utc",
    "new_id",
    "next_position",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def iso_utc(value: datetime) -> str: ...
@overload
def iso_utc(value: None) -> None: ...
def iso_utc(value: datetime | None) -> str | None:
    """A moment as the record writes it in JSON: ISO 8601 in UTC (``+00:00``); None stays None."""
    return None if value is None else value.astimezone(UTC).isoformat()


def new_id() -> str:
    return str(uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """The record's one datetime column type: aware UTC in, aware UTC out.

    A naive datetime is refused on the way in (the record never guesses a zone); SQLite keeps no
    zone, so a value read back from it is the stored UTC instant made aware again. Code reading
    the record never needs to repair a datetime.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: the record stores aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def next_position(session: Any, n: Any, owner: Any, owner_id: str) -> int:
    """The next position ``n`` in one owner's sequence of rows (a run's step records, a user's or a
    version's or a deviation's events): one more than the highest so far. Call it inside a write
    session: it holds the record's write lock, so no other writer takes the same position."""
    last = session.exec(select(func.max(n)).where(owner == owner_id)).one()
    return int(last or 0) + 1


def _ts(**kw: object) -> object:
    return Field(sa_column=Column(UTCDateTime(), nullable=False), **kw)  # type: ignore[call-overload]


def _text(nullable: bool = False) -> object:
    return Field(sa_column=Column(Text, nullable=nullable))


class User(SQLModel, table=True):
    __tablename__ = "sf_user"
    id: str = Field(default_factory=new_id, primary_key=True)
    username: str = Field(unique=True, index=True)
    printed_name: str
    password_hash: str
    created_at: datetime = _ts()  # type: ignore[assignment]
    created_by: str | None = None


class RoleGrant(SQLModel, table=True):
    __tablename__ = "sf_role_grant"
    id: str = Field(default_factory=new_id, primary_key=True)
    user_id: str = Field(foreign_key="sf_user.id", index=True)
    institution: str
    role: str
    granted_at: datetime = _ts()  # type: ignore[assignment]
    granted_by: str | None = None


class UserEvent(SQLModel, table=True):
    """A change to an account; the ``User`` row itself never changes (see ``flows.record.accounts``).

    Kinds: ``password_set`` (``data_json`` holds the new argon2 hash), ``disabled``, ``enabled``,
    ``locked`` (``data_json``: the failed sign-ins that locked it), ``unlocked``, ``language``
    (``data_json``: the language the user chose for pages and documents, ``en`` or ``zh``). The newest event
    of a kind's pair is the account's state, newest by position ``n``, never by clock.
    """

    __tablename__ = "sf_user_event"
    __table_args__ = (UniqueConstraint("user_id", "n"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    user_id: str = Field(foreign_key="sf_user.id", index=True)
    n: int
    """Position among this user's events (1, 2, …)."""
    kind: str
    data_json: str = _text()  # type: ignore[assignment]
    at: datetime = _ts()  # type: ignore[assignment]
    actor: str
    """The user id of who made the change, ``admin`` (installation administrator) or ``system`` (lockout)."""


class TrainingRecord(SQLModel, table=True):
    """A user is trained on one SOP revision at one institution (21 CFR 11.10(i)); required to sign its steps."""

    __tablename__ = "sf_training"
    id: str = Field(default_factory=new_id, primary_key=True)
    user_id: str = Field(foreign_key="sf_user.id", index=True)
    institution: str
    sop_id: str
    sop_version: int
    trained_at: datetime = _ts()  # type: ignore[assignment]
    trainer: str
    """The trainer's printed name (or sopflow user name), as the training form says."""
    recorded_by: str
    """The user id of who entered the record, or ``admin``."""
    recorded_at: datetime = _ts()  # type: ignore[assignment]


class SopVersion(SQLModel, table=True):
    """The exact text of an SOP revision; its state is its newest ``SopVersionEvent`` (``flows.record.versions``)."""

    __tablename__ = "sf_sop_version"
    __table_args__ = (UniqueConstraint("institution", "sop_id", "sha256"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    institution: str
    sop_id: str
    version: int
    schema_version: int
    sha256: str
    text: str = _text()  # type: ignore[assignment]
    stored_at: datetime = _ts()  # type: ignore[assignment]


class SopVersionEvent(SQLModel, table=True):
    """A change of an SOP version's state; the newest row (by ``n``) is the version's state.

    States (``flows.record.versions``): ``draft``, ``in_review``, ``approved``, ``issued``
    (training window), ``effective``, ``superseded``, ``retired``, ``rejected`` (change control
    rejected it; its number is never reused). A periodic review that finds no change appends
    ``effective`` again, signed, with the next ``review_due``. A signed event carries the signer's
    printed name, the meaning and the sha256 of what was signed (``versions.append_version_event``; for
    approval and rejection, the change-control signature's own hash).
    """

    __tablename__ = "sf_sop_version_event"
    __table_args__ = (UniqueConstraint("version_id", "n"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    version_id: str = Field(foreign_key="sf_sop_version.id", index=True)
    n: int
    state: str
    data_json: str = _text()  # type: ignore[assignment]
    """effective_at, training_due, review_due, change-control run id, … as the state needs."""
    actor: str
    """The user id, ``system`` (the sweep) or ``admin``."""
    printed_name: str | None = None
    meaning: str | None = None
    signed_sha256: str | None = None
    reason: str | None = None
    at: datetime = _ts()  # type: ignore[assignment]


class TrainingAssignment(SQLModel, table=True):
    """Training a user must complete on an issued SOP version by ``due_at`` (one row per user and version)."""

    __tablename__ = "sf_training_assignment"
    __table_args__ = (UniqueConstraint("user_id", "version_id"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    user_id: str = Field(foreign_key="sf_user.id", index=True)
    version_id: str = Field(foreign_key="sf_sop_version.id")
    institution: str
    sop_id: str
    sop_version: int
    roles_json: str
    """The roles the user holds that sign steps of the version (why they were assigned)."""
    due_at: datetime = _ts()  # type: ignore[assignment]
    assigned_at: datetime = _ts()  # type: ignore[assignment]


class Reminder(SQLModel, table=True):
    """A reminder the sweep sent once: overdue training, a periodic review coming due."""

    __tablename__ = "sf_reminder"
    __table_args__ = (UniqueConstraint("kind", "object_id"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    kind: str
    """``issued`` (object: the version), ``training_overdue`` (an assignment) or ``review_due`` (version id + due date)."""
    object_id: str
    deliveries_json: str = _text()  # type: ignore[assignment]
    at: datetime = _ts()  # type: ignore[assignment]


class SopRun(SQLModel, table=True):
    """One execution of one SOP revision; its flow run in Prefect is ``flow_run_id``."""

    __tablename__ = "sf_run"
    id: str = Field(default_factory=new_id, primary_key=True)
    institution: str
    sop_version_id: str = Field(foreign_key="sf_sop_version.id")
    sop_id: str
    sop_version: int
    sop_sha256: str
    schema_version: int
    params_json: str = _text()  # type: ignore[assignment]
    product_json: str | None = _text(nullable=True)  # type: ignore[assignment]
    """The product's catalogue entry as it stood when the run started (the limits the checks used)."""
    flow_run_id: str
    started_by: str = Field(foreign_key="sf_user.id")
    started_at: datetime = _ts()  # type: ignore[assignment]
    parent_run_id: str | None = Field(default=None, foreign_key="sf_run.id", index=True)
    """A sub-run's parent (``subrun`` step or a check's deviation SOP); started by the system for the parent's starter."""
    parent_step_id: str | None = None


class RunEvent(SQLModel, table=True):
    """A change of a run's status; the newest row is the run's status.

    Statuses: ``scheduled`` (created, not yet picked up), ``running``, ``waiting`` (a human step
    waits), ``completed``, ``rejected`` (a signer rejected the dose), ``stopped`` (a check with
    ``on_fail: stop`` failed), ``failed`` (an engine error; see detail).
    """

    __tablename__ = "sf_run_event"
    __table_args__ = (UniqueConstraint("run_id", "n"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    run_id: str = Field(foreign_key="sf_run.id", index=True)
    n: int
    """Position among this run's events (1, 2, …): the order, whatever the clock says."""
    status: str
    detail: str | None = None
    at: datetime = _ts()  # type: ignore[assignment]


class StepRecord(SQLModel, table=True):
    """What happened at one step; the newest row for (run, step) is the step's state.

    Statuses: ``waiting`` (a human step waits for signed input), ``signed`` (input and signature
    recorded; the flow has not yet accepted it), ``done`` (the step completed), ``failed`` (a
    check failed), ``refused`` (the flow refused a resume: forged or mismatched signature), ``held``
    (the run's dose is quarantined by another run's deviation: the gate or sub-run waits for its
    disposition), ``skipped`` (its ``when:`` was false; it never ran). A ``subrun`` step (and a
    check's ``<check>__deviation`` link) is ``waiting`` with ``subrun_id`` while its sub-run runs,
    then ``done`` with what the sub-run gave. A repetition of a repeated step is recorded under
    ``<step>#<n>``.
    """

    __tablename__ = "sf_step_record"
    __table_args__ = (UniqueConstraint("run_id", "n"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    run_id: str = Field(foreign_key="sf_run.id", index=True)
    n: int
    """Position among this run's step records (1, 2, …): the order, whatever the clock says."""
    step_id: str
    kind: str
    status: str
    data_json: str = _text()  # type: ignore[assignment]
    actor_id: str | None = Field(default=None, foreign_key="sf_user.id")
    signature_id: str | None = None
    supersedes_id: str | None = None
    reason: str | None = None
    task_run_id: str | None = None
    at: datetime = _ts()  # type: ignore[assignment]


class Signature(SQLModel, table=True):
    """An electronic signature: who, when, what it means, and the hash of exactly what was signed."""

    __tablename__ = "sf_signature"
    id: str = Field(default_factory=new_id, primary_key=True)
    run_id: str = Field(foreign_key="sf_run.id", index=True)
    step_id: str
    user_id: str = Field(foreign_key="sf_user.id")
    printed_name: str
    meaning: str
    """performed / verified / approved / rejected / reviewed"""
    statement: str | None = None
    """The SOP's words for what this signature means."""
    signed_at: datetime = _ts()  # type: ignore[assignment]
    signed_sha256: str
    """sha256 of the canonical JSON of what was signed (see ``ledger.signed_content``)."""


class Deviation(SQLModel, table=True):
    __tablename__ = "sf_deviation"
    id: str = Field(default_factory=new_id, primary_key=True)
    run_id: str = Field(foreign_key="sf_run.id", index=True)
    step_id: str
    classification: str
    description: str = _text()  # type: ignore[assignment]
    quarantine: bool
    opened_at: datetime = _ts()  # type: ignore[assignment]


class DeviationEvent(SQLModel, table=True):
    """One lifecycle event of a deviation (``flows.record.deviations``): the deviation's state is its events.

    Kinds: those of ``updates_deviation`` (contained, mah_notified, investigated, disposition,
    capa, effectiveness, closed) and ``subrun`` (its handling SOP was started: ``data`` names the run).
    ``data_json`` is what the step's signer entered (a disposition's ``decision``; a capa's
    ``action``, ``owner``, ``due``).
    """

    __tablename__ = "sf_deviation_event"
    __table_args__ = (UniqueConstraint("deviation_id", "n"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    deviation_id: str = Field(foreign_key="sf_deviation.id", index=True)
    n: int
    kind: str
    data_json: str = _text()  # type: ignore[assignment]
    run_id: str = Field(foreign_key="sf_run.id")
    """The run whose step recorded the event."""
    step_id: str
    actor_id: str | None = Field(default=None, foreign_key="sf_user.id")
    signature_id: str | None = None
    at: datetime = _ts()  # type: ignore[assignment]


class Document(SQLModel, table=True):
    __tablename__ = "sf_document"
    id: str = Field(default_factory=new_id, primary_key=True)
    run_id: str = Field(foreign_key="sf_run.id", index=True)
    step_id: str
    template: str
    path: str
    sha256: str
    rendered_at: datetime = _ts()  # type: ignore[assignment]


class Escalation(SQLModel, table=True):
    """A human step waited longer than its ``timeout``: who was told, when, and how it went.

    Kinds: ``escalate`` (the ``escalate_to`` role was notified) and ``deviation`` (a deviation was
    opened as well; ``deviation_id``). One row per waiting period: ``waiting_id`` is the step's
    first ``waiting`` record, unique here, so a period is escalated exactly once.
    """

    __tablename__ = "sf_escalation"
    id: str = Field(default_factory=new_id, primary_key=True)
    run_id: str = Field(foreign_key="sf_run.id", index=True)
    step_id: str
    waiting_id: str = Field(unique=True)
    kind: str
    to_role: str | None = None
    deliveries_json: str = _text()  # type: ignore[assignment]
    deviation_id: str | None = None
    waiting_since: datetime = _ts()  # type: ignore[assignment]
    at: datetime = _ts()  # type: ignore[assignment]


class OutboxMessage(SQLModel, table=True):
    """A notification recorded before anyone tries to deliver it (``flows.engine.outbox``).

    ``key`` is its idempotency key, unique: what caused it (``notify:<run>:<step>``,
    ``waiting:<step record>``, ``escalation:<waiting record>``, ``deadline:<deviation>``,
    ``reminder:<kind>:<object>``), so the same cause never queues a second message. Channels are
    resolved at delivery from the notification configuration (their URLs hold tokens; none is stored).
    ``lease`` names the lease held by whoever queued it (``flows.engine.leases``).
    """

    __tablename__ = "sf_outbox"
    # The outbox sweep reads only the messages of the last ``RETRY_FOR``: by time, not every message ever.
    __table_args__ = (Index("ix_sf_outbox_at", "at"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    key: str = Field(unique=True)
    run_id: str | None = Field(default=None, index=True)
    institution: str
    roles_json: str
    title: str = _text()  # type: ignore[assignment]
    body: str = _text()  # type: ignore[assignment]
    message_json: str | None = _text(nullable=True)  # type: ignore[assignment]
    """The message's facts (``flows.outputs.messages.Message``) when it is written per channel; ``body``
    is its plain text."""
    lease: str
    at: datetime = _ts()  # type: ignore[assignment]


class OutboxDelivery(SQLModel, table=True):
    """One step of delivering an ``OutboxMessage`` to one channel; the newest row (by ``n``) is its state.

    Statuses: ``attempt`` (about to hand the message to the channel: written before, so a crash
    after it is never followed by a second delivery), ``delivered``, ``failed`` (the channel refused
    or was down; retried later), ``interrupted`` (an ``attempt`` whose worker died before saying how
    it went: it may or may not have arrived, and is not sent again: at most once), ``unaddressed``
    (the message's roles had no channel when it was due: one row, with no channel).
    """

    __tablename__ = "sf_outbox_delivery"
    __table_args__ = (UniqueConstraint("message_id", "channel_sha256", "n"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    message_id: str = Field(foreign_key="sf_outbox.id", index=True)
    channel_sha256: str
    """sha256 of the channel's URL: identifies it without storing its token."""
    channel: str
    """The URL's scheme and host only (``flows.outputs.notify``)."""
    role: str
    n: int
    """Position among this message's rows for this channel (1, 2, …)."""
    status: str
    holder: str
    """The lease held while this row was written (``run:<flow run>`` or ``job:<name>``)."""
    at: datetime = _ts()  # type: ignore[assignment]


class AuditEvent(SQLModel, table=True):
    """One link of the tamper-evident chain: ``hash = sha256(prev_hash + canonical(event))``."""

    __tablename__ = "sf_audit"
    # Lockout counting and a run's export look events up by what they are about.
    __table_args__ = (Index("ix_sf_audit_object", "object_type", "object_id"),)
    seq: int = Field(primary_key=True)
    at: datetime = _ts()  # type: ignore[assignment]
    actor: str
    """The user id, or ``system`` for the engine."""
    action: str
    object_type: str
    object_id: str
    payload_json: str = _text()  # type: ignore[assignment]
    reason: str | None = None
    prev_hash: str = Field(unique=True)
    hash: str = Field(unique=True)


# -- issue 13: installation administrator, institutions, role revocations, API tokens (record
# tables, audit-chained like the rest), and two operational tables that are not records:
# document bytes (content-addressed, checked by the sha256 their Document row holds) and web sessions.


class AdminKey(SQLModel, table=True):
    """The installation administrator's key (``flows.services.guard.require_admin``): only its sha256
    is stored; the newest row is the key in force. The key itself lives in a file readable only by
    the operating-system user that runs sopflow's administration (``SOPFLOW_ADMIN_KEY_FILE``)."""

    __tablename__ = "sf_admin_key"
    id: str = Field(default_factory=new_id, primary_key=True)
    key_sha256: str = Field(unique=True)
    os_user: str
    host: str
    created_at: datetime = _ts()  # type: ignore[assignment]


class InstitutionSetup(SQLModel, table=True):
    """An institution set up by the installation administrator, with its first QA officer."""

    __tablename__ = "sf_institution"
    id: str = Field(default_factory=new_id, primary_key=True)
    institution: str = Field(unique=True)
    name: str
    first_officer_id: str = Field(foreign_key="sf_user.id")
    admin_key_id: str = Field(foreign_key="sf_admin_key.id")
    os_user: str
    host: str
    added_at: datetime = _ts()  # type: ignore[assignment]


class RoleRevocation(SQLModel, table=True):
    """A role grant withdrawn; the ``RoleGrant`` row stays. A later grant of the same role is a new row."""

    __tablename__ = "sf_role_revocation"
    id: str = Field(default_factory=new_id, primary_key=True)
    grant_id: str = Field(foreign_key="sf_role_grant.id", unique=True)
    revoked_by: str
    reason: str = _text()  # type: ignore[assignment]
    revoked_at: datetime = _ts()  # type: ignore[assignment]


class ApiToken(SQLModel, table=True):
    """An integration client's token: only its sha256 is stored. It acts as one service account at
    one institution, for the actions in ``scopes_json`` (``flows.services.tokens``)."""

    __tablename__ = "sf_api_token"
    id: str = Field(default_factory=new_id, primary_key=True)
    name: str
    institution: str
    account_id: str = Field(foreign_key="sf_user.id")
    scopes_json: str = _text()  # type: ignore[assignment]
    token_sha256: str = Field(unique=True)
    created_by: str
    created_at: datetime = _ts()  # type: ignore[assignment]


class ApiTokenRevocation(SQLModel, table=True):
    """A token withdrawn: from this row on every use of it is refused. The token row stays."""

    __tablename__ = "sf_api_token_revocation"
    id: str = Field(default_factory=new_id, primary_key=True)
    token_id: str = Field(foreign_key="sf_api_token.id", unique=True)
    revoked_by: str
    reason: str = _text()  # type: ignore[assignment]
    revoked_at: datetime = _ts()  # type: ignore[assignment]


class DocumentContent(SQLModel, table=True):
    """The bytes of rendered documents, by their sha256, so every web node and worker reads them
    from the database. Inserted once, never changed; not audit-chained row by row: the ``Document``
    rows that name the sha256 are, and a reader re-checks the bytes against it."""

    __tablename__ = "sf_document_content"
    sha256: str = Field(primary_key=True)
    size: int
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    stored_at: datetime = _ts()  # type: ignore[assignment]


class WebSession(SQLModel, table=True):
    """A web session, shared by every web process (``flows.services.web_sessions``). Not a quality
    record (sign-ins and sign-outs are, in the audit chain): its ``last_seen``, language, page and
    messages change as the visitor goes; it ends once (``ended_at``), and ended rows are purged
    after a day. Only the sha256 of the browser's token is stored."""

    __tablename__ = "sf_web_session"
    token_sha256: str = Field(primary_key=True)
    csrf: str
    language: str
    username: str | None = None
    printed_name: str | None = None
    here: str = "/inbox"
    flash_json: str = _text()  # type: ignore[assignment]
    created_at: float = Field(sa_column=Column(Float, nullable=False))
    last_seen: float = Field(sa_column=Column(Float, nullable=False, index=True))
    ended_at: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    ended_why: str | None = None


class AuditCheckpoint(SQLModel, table=True):
    """A signed checkpoint of the audit chain's head (``flows.record.checkpoints``): event ``seq`` had
    hash ``head_hash``, signed with the Ed25519 key ``key_id`` whose private half lives in a file outside
    the database. Not audit-chained (writing one would move the head it covers): its signature protects
    it, and checkpoints are numbered 1, 2, … so a removed one shows."""

    __tablename__ = "sf_audit_checkpoint"
    n: int = Field(primary_key=True)
    seq: int = Field(index=True)
    head_hash: str
    created_at: datetime = _ts()  # type: ignore[assignment]
    key_id: str
    signature: str
    """Base64 of the Ed25519 signature over ``flows.record.checkpoints.signed_bytes``."""


# -- issue 11: the current state, for reads that cost what is open, not what is past. Not records:
# ``flows.record.current`` keeps them, in the transaction of every ledger append, updating and
# deleting rows as the record moves on; ``audit verify`` checks them against the record rows.


class CurrentRun(SQLModel, table=True):
    """Every run with its status now (its newest ``RunEvent``) and what the runs list filters on."""

    __tablename__ = "sf_current_run"
    __table_args__ = (
        Index("ix_sf_current_run_started", "started_at"),
        Index("ix_sf_current_run_open", "open", "started_at"),
        Index("ix_sf_current_run_institution", "institution", "started_at"),
        Index("ix_sf_current_run_status", "status", "started_at"),
        Index("ix_sf_current_run_sop", "sop_id", "started_at"),
        Index("ix_sf_current_run_product", "product", "started_at"),
        Index("ix_sf_current_run_coi", "coi", "started_at"),
    )
    run_id: str = Field(primary_key=True, foreign_key="sf_run.id")
    institution: str
    sop_id: str
    sop_version: int
    product: str | None = None
    """The product's catalogue id (the run's ``type: product`` parameter), when the SOP has one."""
    coi: str | None = None
    status: str | None = None
    """None until the run's first ``RunEvent``."""
    detail: str | None = _text(nullable=True)  # type: ignore[assignment]
    status_n: int = 0
    """The ``n`` of the ``RunEvent`` that set ``status`` (0: none yet)."""
    open: bool
    """Not yet in a final status (``flows.record.state.FINAL_STATUSES``)."""
    started_at: datetime = _ts()  # type: ignore[assignment]


class CurrentStep(SQLModel, table=True):
    """Each step of each run with its newest ``StepRecord``: what waits (``status``), since when, and
    its waiting period's first ``waiting`` record (escalations count from it)."""

    __tablename__ = "sf_current_step"
    __table_args__ = (Index("ix_sf_current_step_status", "status", "at"),)
    run_id: str = Field(primary_key=True, foreign_key="sf_run.id")
    step_id: str = Field(primary_key=True)
    record_id: str
    n: int
    """The newest record's position in the run."""
    first_n: int
    """The position of the step's first record (the order steps appear in a run)."""
    status: str
    at: datetime = _ts()  # type: ignore[assignment]
    first_waiting_id: str | None = None
    first_waiting_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class CurrentQuarantine(SQLModel, table=True):
    """A deviation with ``quarantine: true`` and no disposition yet: its dose (``coi``) is held."""

    __tablename__ = "sf_current_quarantine"
    deviation_id: str = Field(primary_key=True, foreign_key="sf_deviation.id")
    coi: str | None = Field(default=None, index=True)
    run_id: str
    opened_at: datetime = _ts()  # type: ignore[assignment]


CURRENT_TABLES: tuple[type[SQLModel], ...] = (CurrentRun, CurrentStep, CurrentQuarantine)
"""The current-state tables (``flows.record.current``)."""


class SignInThrottle(SQLModel, table=True):
    """Failed sign-ins counted per key, shared by every process (``flows.services.throttle``): a key
    is ``pair:<user name> <client>`` (one account from one client) or ``client:<client>`` (one client,
    all accounts). Not a quality record (every failed sign-in is one, ``auth.failed`` in the audit
    chain): a row's count grows with failures and restarts with a success (pairs) or after a quiet
    window (clients); ``blocked_until`` (wall-clock seconds) refuses the key's sign-ins unchecked."""

    __tablename__ = "sf_sign_in_throttle"
    key: str = Field(primary_key=True)
    failures: int = 0
    first_at: float = Field(sa_column=Column(Float, nullable=False))
    last_at: float = Field(sa_column=Column(Float, nullable=False, index=True))
    blocked_until: float | None = Field(default=None, sa_column=Column(Float, nullable=True))


RECORD_TABLES: dict[str, type[SQLModel]] = {
    t.__tablename__: t
    for t in (
        User,
        RoleGrant,
        UserEvent,
        TrainingRecord,
        SopVersion,
        SopRun,
        RunEvent,
        StepRecord,
        Signature,
        Deviation,
        DeviationEvent,
        Document,
        Escalation,
        SopVersionEvent,
        TrainingAssignment,
        Reminder,
        AdminKey,
        InstitutionSetup,
        RoleRevocation,
        ApiToken,
        ApiTokenRevocation,
        OutboxMessage,
        OutboxDelivery,
    )
}
"""Every table whose rows the audit chain covers, by table name."""
