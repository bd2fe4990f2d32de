"""Stage 5: the schema of sopflow's database, for ``sopflow db status`` and ``sopflow db upgrade``.

Every other service passes ``flows.record.db.init_db``, which refuses a database whose schema is not
the code's; these two are the only ones that work on such a database. Must not import prefect.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.config import Settings
from flows.record.db import init_db, safe_url, schema_status, upgrade_db

__all__ = ["DatabaseStatus", "require_current", "status", "upgrade"]


@dataclass(frozen=True)
class DatabaseStatus:
    """What ``sopflow db status`` prints: the state, the revisions, what an upgrade would apply."""

    url: str
    state: str
    revision: str | None
    head: str
    pending: list[str]
    versioned: bool
    refusal: str
    """The line every other command prints on this database ('' when they run)."""


def status(settings: Settings) -> DatabaseStatus:
    """Where the database stands against this sopflow's schema; reads only.

    Raises:
        ConfigError: the database cannot be reached.
    """
    st = schema_status(settings.database_url)
    where = safe_url(settings.database_url)
    return DatabaseStatus(where, st.state, st.revision, st.head, st.pending, st.versioned, st.refusal(where))


def upgrade(settings: Settings) -> list[str]:
    """Apply every pending migration (one transaction, under the schema lock); returns what was applied.

    Raises:
        SchemaVersionError: the database is ahead of this sopflow, or holds tables of no release.
        ConfigError: the database cannot be reached, or a migration failed (nothing of it stays).
    """
    return upgrade_db(settings.database_url)


def require_current(settings: Settings) -> None:
    """Refuse to go on unless the database is at this sopflow's schema (an empty one is made so).

    Raises:
        SchemaVersionError: behind (``sopflow db upgrade``), ahead, or unknown.
        ConfigError: the database cannot be reached.
    """
    init_db(settings.database_url)
