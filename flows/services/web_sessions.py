"""The service floor: web sessions in sopflow's database, so every web process behind a proxy knows
them and a restart signs nobody out (``flows.web.sessions`` is the web's side of it).

A row per session (``WebSession``), keyed by the sha256 of the browser's token: whoever reads the
database cannot take over a session. Sessions are not quality records (sign-ins, sign-outs and
idle ends are, in the audit chain, written by ``accounts``): the row's ``last_seen``, language,
page and messages change as the visitor goes, and it ends exactly once: ``end`` sets ``ended_at``
only where it is still empty, so of two processes ending the same session (an idle timeout seen
by both) one wins and audits it. Ended and abandoned anonymous rows are purged after a day.
Times are wall-clock seconds (``time.time``): processes on several hosts compare them.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import RowMapping, bindparam, delete, update
from sqlalchemy import select as sa_select
from sqlmodel import col, select

from flows.record.db import init_db, read_session, write_session
from flows.record.ledger import sha256_hex
from flows.record.tables import WebSession

__all__ = ["create", "end", "idle_since", "load", "prepare", "purge", "save", "token_key", "touch"]

PURGE_AFTER = 24 * 3600.0
"""Ended sessions (and anonymous ones nobody came back to) are deleted after this many seconds."""


def prepare(url: str) -> None:
    """Create the table when it does not exist yet (once per process)."""
    init_db(url)


def token_key(token: str) -> str:
    """What the database keeps of a browser's token: its sha256."""
    return sha256_hex(token.encode())


def _row(row: RowMapping) -> dict[str, Any]:
    """A session as the web side takes it, from a row of ``_LOAD``."""
    return {
        "key": row["token_sha256"],
        "csrf": row["csrf"],
        "language": row["language"],
        "username": row["username"],
        "printed_name": row["printed_name"],
        "here": row["here"],
        "flash": [tuple(f) for f in json.loads(row["flash_json"] or "[]")],
        "last_seen": row["last_seen"],
        "ended_at": row["ended_at"],
    }


def create(url: str, key: str, csrf: str, language: str, now: float, **signed_in: str | None) -> None:
    """A new session (``username`` and ``printed_name`` when signed in)."""
    with write_session(url) as s:
        s.add(
            WebSession(
                token_sha256=key,
                csrf=csrf,
                language=language,
                username=signed_in.get("username"),
                printed_name=signed_in.get("printed_name"),
                flash_json="[]",
                created_at=now,
                last_seen=now,
            )
        )


_TABLE = WebSession.__table__  # type: ignore[attr-defined]
_LOAD = sa_select(
    *(
        _TABLE.c[k]
        for k in ("token_sha256", "csrf", "language", "username", "printed_name", "here", "flash_json", "last_seen")
    ),
    _TABLE.c.ended_at,
).where(_TABLE.c.token_sha256 == bindparam("key"))
"""Every request reads its session: a plain statement of the table's columns, not an ORM load
(measured: a quarter of the ORM's cost per read)."""


def load(url: str, key: str) -> dict[str, Any] | None:
    """The session, ended or not, or None."""
    with read_session(url) as s:
        row = s.execute(_LOAD, {"key": key}).first()
        return _row(row._mapping) if row is not None else None


def touch(url: str, key: str, now: float) -> None:
    with write_session(url) as s:
        s.exec(update(WebSession).where(col(WebSession.token_sha256) == key).values(last_seen=now))


def save(url: str, key: str, language: str, here: str, flash: list[tuple[str, str]]) -> None:
    """What a page changed: the language, the page last shown, the messages for the next page."""
    with write_session(url) as s:
        s.exec(
            update(WebSession)
            .where(col(WebSession.token_sha256) == key)
            .values(language=language, here=here, flash_json=json.dumps(flash, ensure_ascii=False))
        )


def end(url: str, key: str, now: float, why: str) -> dict[str, Any] | None:
    """End a session that has not ended yet; the session when this call ended it, else None."""
    with write_session(url) as s:
        result = s.exec(
            update(WebSession)
            .where(col(WebSession.token_sha256) == key, col(WebSession.ended_at).is_(None))
            .values(ended_at=now, ended_why=why)
        )
        if result.rowcount != 1:
            return None
        row = s.execute(_LOAD, {"key": key}).first()
        return _row(row._mapping) if row is not None else None


def idle_since(url: str, before: float) -> list[str]:
    """Keys of the live sessions last seen before ``before`` (the idle timeout's candidates)."""
    with read_session(url) as s:
        query = select(WebSession.token_sha256).where(
            col(WebSession.ended_at).is_(None), col(WebSession.last_seen) < before
        )
        return list(s.exec(query))


def purge(url: str, now: float) -> None:
    """Delete sessions ended, or anonymous and unused, more than ``PURGE_AFTER`` ago."""
    cutoff = now - PURGE_AFTER
    with write_session(url) as s:
        s.exec(delete(WebSession).where(col(WebSession.ended_at) < cutoff))
        s.exec(delete(WebSession).where(col(WebSession.username).is_(None), col(WebSession.last_seen) < cutoff))
