"""Stage 2: leases: who executes a flow run, who runs a periodic job, now, across every worker.

A lease is a lock that lives exactly as long as its holder's process:

- on PostgreSQL, a session-level advisory lock (``pg_try_advisory_lock``) held on one connection
  each worker keeps for its whole life. ``kill -9`` closes the socket and PostgreSQL releases the
  lock at once; a machine lost for good (power, network) stops answering TCP, and the server drops
  the session after its keepalives fail (``tcp_keepalives_*`` and ``tcp_user_timeout``, set per
  session below: about 15 s), which releases it too;
- on SQLite (one machine by nature), an ``flock`` on a file beside the database, released by the
  kernel when the process dies.

Why not a lease row with an expiry: renewing it writes a row every few seconds per worker into a
record that is append-only, and its expiry is a guess against clocks. Why not Prefect's flow-run
heartbeats and zombie detection: they need a server-side automation per installation, heartbeats
every 30 s or more (a zombie is declared only after several are missed), and mark the run
``Crashed``, after which something must still reschedule it. A lock the database releases when its
holder is gone answers "is anybody executing this?" exactly, at once, with no writes and no clock.

Keys: ``run:<flow run id>`` is held while a worker executes that flow run (taken before it claims
the run, released after the run suspended or ended); ``job:<name>`` while a worker runs one
periodic job. Holding ``run:X`` and finding a flow run ``Running`` under no lease means its worker
died: another worker takes it over (``flows.engine.executor``). Must not import prefect.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from flows.errors import ConfigError
from flows.record.db import get_engine

__all__ = ["Leases", "dedicated_connection", "job_key", "leases_for", "run_key"]

log = logging.getLogger("sopflow.leases")

# The server drops a session whose peer stopped answering after about idle + interval * count
# seconds, or after tcp_user_timeout for unacknowledged data: the lease of a lost machine ends.
_KEEPALIVE = (
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3;"
    " SET tcp_user_timeout = 10000"
)


def run_key(flow_run_id: object) -> str:
    return f"run:{flow_run_id}"


def job_key(name: str) -> str:
    return f"job:{name}"


def _pg_key(key: str) -> int:
    """A signed 64-bit advisory-lock key for a lease name (namespaced, so it never equals the
    record's write lock in ``flows.record.db``)."""
    return int.from_bytes(hashlib.sha256(f"sopflow-lease:{key}".encode()).digest()[:8], "big", signed=True)


def dedicated_connection(database_url: str) -> Any:
    """A DBAPI connection of its own (outside the pool, autocommit): one that lives as long as the worker."""
    engine = get_engine(database_url)
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    conn = engine.dialect.connect(*cargs, **cparams)
    conn.autocommit = True
    return conn


@cache
def leases_for(database_url: str) -> Leases:
    """This process's one set of leases on a database (one lease connection per process)."""
    return Leases(database_url)


class Leases:
    """The leases of one worker process, on sopflow's database (see the module docstring).

    Thread-safe: every call takes an internal lock. Within the process a lease has an ``owner``
    (default: the key itself): the same owner may take it again (a count), another owner may not,
    so the executor can take ``run:X`` before it claims the run and the flow's own code can take it
    again while it runs, but the outbox's sweep (owner ``job:outbox``) cannot while the run executes.
    """

    def __init__(self, database_url: str) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, int]] = {}
        self._files: dict[str, int] = {}
        self._url = database_url
        self._conn: Any = None
        engine = get_engine(database_url)
        if engine.dialect.name == "postgresql":
            self._conn = dedicated_connection(database_url)
            with contextlib.closing(self._conn.cursor()) as cur:
                cur.execute(_KEEPALIVE)
        elif engine.dialect.name == "sqlite":
            path = database_url.split("///", 1)[-1]
            if not path or path == ":memory:":
                raise ConfigError(f"leases need a database file, not {database_url!r}")
            self._dir = Path(f"{path}.leases")
            self._dir.mkdir(parents=True, exist_ok=True)
        else:
            raise ConfigError(f"leases support PostgreSQL and SQLite, not {engine.dialect.name}")

    # -- the one primitive ---------------------------------------------------------------------
    def try_hold(self, key: str, owner: str | None = None) -> bool:
        """Take the lease ``key`` for ``owner`` unless another process or another owner holds it."""
        owner = owner or key
        with self._lock:
            if key in self._held:
                holder, count = self._held[key]
                if holder != owner:
                    return False
                self._held[key] = (holder, count + 1)
                return True
            if not self._acquire(key):
                return False
            self._held[key] = (owner, 1)
            return True

    def release(self, key: str) -> None:
        with self._lock:
            holder, count = self._held.get(key, ("", 0))
            if count > 1:
                self._held[key] = (holder, count - 1)
                return
            if count == 1:
                del self._held[key]
                self._release(key)

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._held

    @contextlib.contextmanager
    def hold(self, key: str, owner: str | None = None) -> Iterator[bool]:
        """``with leases.hold(key) as mine:`` — ``mine`` is False (and nothing is held) when someone else has it."""
        mine = self.try_hold(key, owner)
        try:
            yield mine
        finally:
            if mine:
                self.release(key)

    def is_free(self, key: str) -> bool:
        """True when no process holds ``key`` (checked by taking it and letting it go at once)."""
        with self._lock:
            if key in self._held or not self._acquire(key):
                return False
            self._release(key)
            return True

    def alive(self) -> bool:
        """Whether this worker's leases still stand (its lease connection answers)."""
        if self._conn is None:
            return True
        with self._lock:
            try:
                with contextlib.closing(self._conn.cursor()) as cur:
                    cur.execute("SELECT 1")
                return True
            except Exception:
                log.exception("the lease connection is gone: every lease of this worker has ended")
                return False

    def close(self) -> None:
        with self._lock:
            for key in list(self._held):
                self._release(key)
            self._held.clear()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()

    # -- backends ------------------------------------------------------------------------------
    def _acquire(self, key: str) -> bool:
        if self._conn is not None:
            with contextlib.closing(self._conn.cursor()) as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (_pg_key(key),))
                return bool(cur.fetchone()[0])
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        fd = os.open(self._dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._files[key] = fd
        return True

    def _release(self, key: str) -> None:
        if self._conn is not None:
            try:
                with contextlib.closing(self._conn.cursor()) as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (_pg_key(key),))
            except Exception:  # the connection is gone: so is the lock
                log.warning("could not release lease %s: the lease connection is gone", key)
            return
        fd = self._files.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
