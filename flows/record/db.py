"""Stage 3: the database connection for sopflow's records (SQLite or PostgreSQL).

Writers serialise: the audit chain is a single sequence, so every write transaction takes the
database's write lock first (SQLite ``BEGIN IMMEDIATE``, PostgreSQL an advisory transaction lock)
and only then reads the chain's head. Readers never block writers on PostgreSQL and, with WAL,
not on SQLite either.

Schema: ``init_db`` is the gate every service passes before touching the record. An empty database
is brought to the code's schema revision (``flows.record.schema``) there and then; a database behind
or ahead of the code is refused with ``SchemaVersionError`` (one line naming ``sopflow db upgrade``)
before anything is created. Migrations run in one transaction under the migration lock (PostgreSQL:
``pg_advisory_xact_lock``; SQLite: ``BEGIN IMMEDIATE``), so processes that start together on an empty
database migrate it once and all come up. Must not import prefect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session, create_engine

from flows.config import db_pool
from flows.errors import ConfigError, RecordError, SchemaVersionError
from flows.record import (
    current,
    schema,
    tables,  # noqa: F401  (registers the tables with SQLModel.metadata)
)

__all__ = [
    "get_engine",
    "init_db",
    "migration_lock",
    "read_session",
    "safe_url",
    "schema_status",
    "upgrade_db",
    "write_session",
]

_WRITE = "sopflow_write"
_PG_LOCK_KEY = 0x50F_F10E  # one advisory lock: "the audit chain"
_PG_MIGRATE_KEY = 0x50F_F10F  # another: "the schema"
_current: set[str] = set()  # URLs found at the code's schema revision by this process


@cache
def get_engine(url: str) -> Engine:
    """One engine per database URL, shared by the threads of a process; its connection pool is sized
    by ``SOPFLOW_DB_POOL_SIZE`` / ``SOPFLOW_DB_MAX_OVERFLOW`` / ``SOPFLOW_DB_POOL_TIMEOUT`` (``flows.config.db_pool``).

    Raises:
        ConfigError: the URL cannot be used, or a pool setting is wrong.
    """
    sizes = db_pool()
    in_memory = url.startswith("sqlite") and (url.split("///", 1)[1] if "///" in url else "") in ("", ":memory:")
    pool: dict[str, Any] = (
        {}
        if in_memory  # one shared connection (SQLAlchemy's SingletonThreadPool / StaticPool): no sizes
        else {"pool_size": sizes.size, "max_overflow": sizes.overflow, "pool_timeout": sizes.timeout}
    )
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **pool)
            _sqlite_locking(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, **pool)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError, missing driver (ImportError)
        raise ConfigError(f"database URL {url!r} cannot be used: {exc}") from exc
    return engine


def _sqlite_locking(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def init_db(url: str) -> Engine:
    """The engine of a database at the code's schema revision: an empty one is migrated to it first.

    Raises:
        SchemaVersionError: the database is behind the code (``sopflow db upgrade``), ahead of it, or
            holds tables of no release; nothing was created.
        ConfigError: the database cannot be reached.
    """
    engine = get_engine(url)
    if url in _current:
        return engine
    try:
        with engine.connect() as conn:
            st = schema.read_status(conn)
        if st.state == "empty":
            with migration_lock(url) as conn:
                st = schema.read_status(conn)  # another process may have migrated it meanwhile
                if st.state == "empty":
                    schema.upgrade(conn)
                    st = schema.read_status(conn)
    except (OperationalError, DBAPIError) as exc:
        raise ConfigError(f"cannot open the sopflow database {safe_url(url)}: {exc.orig}") from exc
    if st.state != "current":
        raise SchemaVersionError(st.refusal(safe_url(url)))
    _current.add(url)
    return engine


def schema_status(url: str) -> schema.SchemaStatus:
    """Where the database stands against the code's schema (reads only).

    Raises:
        ConfigError: the database cannot be reached.
    """
    try:
        with get_engine(url).connect() as conn:
            return schema.read_status(conn)
    except (OperationalError, DBAPIError) as exc:
        raise ConfigError(f"cannot open the sopflow database {safe_url(url)}: {exc.orig}") from exc


def upgrade_db(url: str) -> list[str]:
    """Bring the database to the code's schema revision, in one transaction under the migration lock;
    returns the revisions applied (none when it was current).

    Raises:
        SchemaVersionError: the database is ahead of the code or holds tables of no release.
        ConfigError: the database cannot be reached, or a migration failed (nothing of it stays).
    """
    try:
        with migration_lock(url) as conn:
            st = schema.read_status(conn)
            if st.state in ("ahead", "unknown"):
                raise SchemaVersionError(st.refusal(safe_url(url)))
            applied = schema.upgrade(conn)
            if any(
                line.split()[0] == CURRENT_STATE_REVISION for line in applied
            ):  # the current-state tables, filled from the record rows
                with Session(bind=conn) as session:
                    current.rebuild(session)
                    session.flush()
    except (OperationalError, DBAPIError) as exc:
        raise ConfigError(
            f"the upgrade of the sopflow database {safe_url(url)} failed, nothing changed: {exc.orig}"
        ) from exc
    _current.add(url)
    return applied


CURRENT_STATE_REVISION = "0004"
"""The revision that adds the current-state tables: an upgrade through it fills them from the record."""


@contextmanager
def migration_lock(url: str) -> Iterator[Connection]:
    """A connection in a transaction that holds the schema lock; commits on success, else rolls back."""
    engine = get_engine(url)
    with engine.connect() as conn:
        conn = conn.execution_options(**{_WRITE: True})
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_KEY})
            yield conn


@contextmanager
def write_session(url: str) -> Iterator[Session]:
    """A transaction holding the write lock; commits on success, rolls back on any error."""
    engine = get_engine(url)
    with Session(engine) as session:
        try:
            conn = session.connection(execution_options={_WRITE: True})
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            yield session
            session.commit()
        except DBAPIError as exc:  # locked, constraint violated (IntegrityError), connection lost...
            session.rollback()
            raise RecordError(f"the sopflow database refused the write: {exc.orig}") from exc
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_session(url: str) -> Iterator[Session]:
    with Session(get_engine(url)) as session:
        yield session


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
