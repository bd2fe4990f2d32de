"""The service floor: checking the audit trail. ``verify_audit`` walks the live chain and every
record row against it (``sopflow audit verify``); ``verify_export`` checks a record exported with
``sopflow record RUN --json`` offline (``flows.record.export``, the stdlib-only checker an
inspector can copy and run alone).
"""

from __future__ import annotations

from typing import Any

from flows.config import Settings
from flows.record import current, ledger
from flows.record.db import init_db, read_session
from flows.record.export import verify_export as _check_export

__all__ = ["verify_audit", "verify_export"]


def verify_audit(settings: Settings) -> ledger.ChainReport:
    """Walk the audit chain and every record row against it, then the current-state tables against the
    record rows (``flows.record.current.compare``); the report names the first break."""
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        report = ledger.verify_chain(s)
        report.problems += current.compare(s)  # the current-state tables against the record (issue 11)
        return report


def verify_export(document: dict[str, Any]) -> list[str]:
    """Every problem of an exported record (empty when it checks out)."""
    return _check_export(document)
