"""Stage 3: which version of sopflow's tables a database holds, and the migrations that bring it to
the code's (Alembic, the revisions in ``flows/record/migrations/versions``).

The version lives in the table ``sf_schema_version`` (Alembic's version table under a name of our
own, so a Prefect server sharing the database keeps its ``alembic_version``). A database is one of:

- ``empty``: no sopflow table at all. ``flows.record.db.init_db`` brings it to head by itself, so a
  new installation (the embedded default, ``sopflow init``, the demo) needs no extra command;
- ``current``: at the code's head revision;
- ``behind``: at an older revision. Nothing runs on it until ``sopflow db upgrade``;
- ``ahead``: at a revision this code does not know (a newer sopflow upgraded it). Nothing runs;
- ``unknown``: sopflow tables but no version, matching no release. Nothing runs.

A database made before the tables were versioned has no version table: it is recognised by its set
of tables (``UNVERSIONED``: cf31c97's tables are revision 0001; the tables of the commits after it,
up to the first versioned one, are 0002) and stamped with that revision by the first upgrade.

The callers hold the lock (``flows.record.db``): every function here takes a connection inside a
transaction that the caller opened under the migration lock (PostgreSQL: an advisory transaction
lock; SQLite: ``BEGIN IMMEDIATE``), so processes starting together migrate once, and a failed
migration leaves nothing behind (DDL is transactional on both). Must not import prefect.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import MetaData, create_engine, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from flows.record import tables  # noqa: F401  (registers the tables with SQLModel.metadata)

if TYPE_CHECKING:  # Alembic is imported where it is used: a command on a current database never needs it
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

__all__ = [
    "MIGRATIONS",
    "UNVERSIONED",
    "VERSION_TABLE",
    "SchemaStatus",
    "differences",
    "draft",
    "head",
    "read_status",
    "upgrade",
]

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "sf_schema_version"

_RELEASE_0001 = frozenset(
    {
        "sf_audit",
        "sf_deviation",
        "sf_deviation_event",
        "sf_document",
        "sf_escalation",
        "sf_reminder",
        "sf_role_grant",
        "sf_run",
        "sf_run_event",
        "sf_signature",
        "sf_sop_version",
        "sf_sop_version_event",
        "sf_step_record",
        "sf_training",
        "sf_training_assignment",
        "sf_user",
        "sf_user_event",
    }
)
UNVERSIONED: dict[frozenset[str], str] = {
    _RELEASE_0001: "0001",
    _RELEASE_0001
    | {
        "sf_admin_key",
        "sf_api_token",
        "sf_api_token_revocation",
        "sf_document_content",
        "sf_institution",
        "sf_outbox",
        "sf_outbox_delivery",
        "sf_role_revocation",
        "sf_web_session",
    }: "0002",
}
"""The revision of a database made before versioning, by its exact set of ``sf_`` tables. Fixed for
good: every database made since carries ``sf_schema_version``, so a new revision never adds a line."""

State = Literal["empty", "current", "behind", "ahead", "unknown"]


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands against the code: ``state``, its revision, the head, what is pending."""

    state: State
    revision: str | None
    head: str
    pending: list[str] = field(default_factory=list)
    """The revisions ``sopflow db upgrade`` would apply, oldest first (with their one-line titles)."""
    versioned: bool = True
    """False for a database made before versioning (its revision is recognised from its tables)."""
    tables: frozenset[str] = frozenset()

    def refusal(self, where: str) -> str:
        """The one line a command prints when it refuses to run on this database ('' when it may run)."""
        if self.state == "behind":
            return (
                f"the sopflow database {where} is at schema revision {self.revision}, this sopflow needs {self.head}: "
                "back it up, then run `sopflow db upgrade`"
            )
        if self.state == "ahead":
            return (
                f"the sopflow database {where} is at schema revision {self.revision}, newer than this sopflow "
                f"(its newest is {self.head}): run the sopflow that upgraded it, or restore a backup"
            )
        if self.state == "unknown":
            return (
                f"the sopflow database {where} has sopflow tables but no schema version, and they match no "
                f"release ({len(self.tables)} tables: {', '.join(sorted(self.tables))}): restore a backup"
            )
        return ""


HEAD = "0005"
"""The newest revision, so that a command on a current database reads one row and never loads Alembic
(half a second of every command's start-up); ``tests/test_migrations.py`` pins it to the scripts' head."""


@cache
def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS))


def head() -> str:
    """The code's head revision."""
    rev = _script().get_current_head()
    assert rev is not None, f"no migration in {MIGRATIONS / 'versions'}"  # noqa: S101  (a broken package)
    return rev


def _titles(revisions: list[str]) -> list[str]:
    script = _script()
    out = []
    for rev in revisions:
        sc = script.get_revision(rev)
        title = (sc.doc or "").strip().splitlines()[0] if sc is not None and sc.doc else ""
        out.append(f"{rev}  {title}".rstrip())
    return out


def _context(conn: Connection, **opts: Any) -> MigrationContext:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, **opts})


def read_status(conn: Connection) -> SchemaStatus:
    """Where the database behind ``conn`` stands. Reads only; creates nothing."""
    found = sa_inspect(conn).get_table_names()
    if VERSION_TABLE in found:  # the common case, without Alembic: at the head this code knows
        revs = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()  # noqa: S608
        if revs == [HEAD]:
            names = frozenset(n for n in found if n.startswith("sf_") and n != VERSION_TABLE)
            return SchemaStatus("current", HEAD, HEAD, versioned=True, tables=names)
    script = _script()
    top = head()
    names = frozenset(n for n in sa_inspect(conn).get_table_names() if n.startswith("sf_") and n != VERSION_TABLE)
    versioned = VERSION_TABLE in sa_inspect(conn).get_table_names()
    rev = _context(conn).get_current_revision() if versioned else None
    if rev is None:
        if not names:
            return SchemaStatus("empty", None, top, _titles(_path(None, top)))
        legacy = UNVERSIONED.get(names)
        if legacy is None:
            return SchemaStatus("unknown", None, top, tables=names, versioned=False)
        rev = legacy
        versioned = False
    known = {sc.revision for sc in script.walk_revisions()}
    if rev not in known:
        return SchemaStatus("ahead", rev, top, versioned=versioned, tables=names)
    if rev == top:
        return SchemaStatus("current", rev, top, versioned=versioned, tables=names)
    return SchemaStatus("behind", rev, top, _titles(_path(rev, top)), versioned=versioned, tables=names)


def _path(start: str | None, end: str) -> list[str]:
    """The revisions after ``start`` up to ``end``, oldest first."""
    revs = [sc.revision for sc in _script().iterate_revisions(end, start or "base")]
    return [r for r in reversed(revs) if r != start]


def upgrade(conn: Connection, target: str | None = None) -> list[str]:
    """Apply the pending revisions up to ``target`` (the head by default) inside the caller's locked
    transaction; returns what was applied, oldest first.

    A database made before versioning is first stamped with the revision its tables show. Refuses
    (``ValueError``, with the status's words) a database that is ahead or unknown."""
    st = read_status(conn)
    if st.state in ("ahead", "unknown"):
        raise ValueError(st.refusal("here"))
    target = target or st.head
    script = _script()
    if not st.versioned and st.revision is not None:
        _context(conn).stamp(script, st.revision)
    start = st.revision
    if start == target:
        return []

    def steps(rev: Any, _context: Any) -> Any:
        return script._upgrade_revs(target, rev)

    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with EnvironmentContext(cfg, script, fn=steps, destination_rev=target) as env:
        env.configure(
            connection=conn, version_table=VERSION_TABLE, target_metadata=SQLModel.metadata, render_as_batch=True
        )
        env.run_migrations()
    return _titles(_path(start, target))


def differences(conn: Connection, metadata: MetaData | None = None) -> list[Any]:
    """What the database's tables lack or have beyond the models (Alembic's ``compare_metadata``);
    empty when the migrations at head build exactly ``metadata`` (``SQLModel.metadata``)."""
    from alembic.autogenerate import compare_metadata

    ctx = _context(conn, compare_type=True, compare_server_default=False)
    diffs = compare_metadata(ctx, SQLModel.metadata if metadata is None else metadata)
    return [d for d in diffs if not _is_version_table(d)]


def _is_version_table(diff: Any) -> bool:
    return isinstance(diff, tuple) and diff[0] == "remove_table" and diff[1].name == VERSION_TABLE


def draft() -> str:
    """The body of the next revision's ``upgrade()``: what the models have beyond the migrations at
    head, as Alembic renders it, with sopflow's column types written as plain SQLAlchemy ones (a
    revision must not import the models). Read it, fix it, and save it as the next file
    (flows/record/migrations/README.md): ``python -c "from flows.record.schema import draft; print(draft())"``."""
    from alembic.autogenerate import produce_migrations, render_python_code

    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{folder}/head.db")
        try:
            with engine.begin() as conn:
                upgrade(conn)
            with engine.connect() as conn:
                ops = produce_migrations(_context(conn, compare_type=True), SQLModel.metadata)
        finally:
            engine.dispose()
    if ops.upgrade_ops is None or ops.upgrade_ops.is_empty():
        return "# the migrations at head already build the models: no revision needed"
    code = render_python_code(ops.upgrade_ops, render_as_batch=True)
    for model_type, plain in (
        ("sqlmodel.sql.sqltypes.AutoString()", "sa.String()"),
        ("flows.record.tables.UTCDateTime()", "sa.DateTime(timezone=True)"),
    ):
        code = code.replace(model_type, plain)
    return code
