"""Stage 3: the database connection for sopflow's records (SQLite or PostgreSQL).

Writers serialise: the audit chain is a single sequence, so every write transaction takes the
database's write lock first (SQLite ``BEGIN IMMEDIATE``, PostgreSQL an advisory transaction lock)
and only then reads the chain's head. Readers never block writers on PostgreSQL and, with WAL,
not on SQLite either. Must not import prefect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session, SQLModel, create_engine, select

from flows.config import db_pool
from flows.errors import ConfigError, RecordError
from flows.record import current, tables  # tables registers them with SQLModel.metadata

__all__ = ["get_engine", "init_db", "read_session", "write_session"]

_WRITE = "sopflow_write"
_PG_LOCK_KEY = 0x50F_F10E  # one advisory lock: "the audit chain"


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
    """Create the tables that do not exist yet; returns the engine. A database made before the
    current-state tables existed gets them filled from its record (``flows.record.current.rebuild``)."""
    engine = get_engine(url)
    if url in _INITIALISED:
        return engine
    try:
        fresh = not inspect(engine).has_table(tables.CurrentRun.__tablename__)
        SQLModel.metadata.create_all(engine)
    except OperationalError as exc:
        raise ConfigError(f"cannot open the sopflow database {_safe(url)}: {exc.orig}") from exc
    if fresh:
        with write_session(url) as session:
            if session.exec(select(tables.SopRun.id).limit(1)).first() is not None:
                current.rebuild(session)
    _INITIALISED.add(url)
    return engine


_INITIALISED: set[str] = set()
"""Databases whose tables this process has made sure of: every service call asks ``init_db`` first,
and checking some thirty tables each time cost more than the read itself (issue 11)."""


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


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
