"""The service floor: reads that show a run's parameters or entered values (patient ids, lots,
clinical values), for a person who signs in first, as the web asks.

``inbox_for`` and ``record_for`` sign the reader in (``guard.sign_in``: audited ``auth.ok`` with
what was read as the purpose, ``auth.failed`` otherwise, failures counting towards the lock) and
show only what a role of theirs reaches (``guard.reader_problem``); a refusal is audited
(``record.read.refused``). The CLI's ``sopflow inbox`` and ``sopflow record`` call these; the web
signs in once per session and asks the same rules. Lists of ids, states and staff (``runs``,
``deviations``, ``chain``, ``user list``) carry no parameters or entered values and stay readable
by whoever runs sopflow's commands (the operating-system account that reaches the database).
"""

from __future__ import annotations

from typing import Any

from flows.config import Settings
from flows.record.db import read_session
from flows.services import guard, inbox, runs

__all__ = ["inbox_for", "record_for"]


def inbox_for(settings: Settings, username: str, password: str) -> list[dict[str, Any]]:
    """What waits on ``username``'s roles, after they signed in.

    Raises:
        AuthenticationError
    """
    guard.sign_in(settings, username, password, "read inbox")
    return inbox.inbox(settings, username)


def record_for(settings: Settings, username: str, password: str, run_id: str) -> dict[str, Any]:
    """A run's quality record for a signed-in user with a role at its institution.

    Raises:
        AuthenticationError, NotFoundError, NotAuthorizedError
    """
    user = guard.sign_in(settings, username, password, f"read record {run_id}")
    rec = runs.quality_record(settings, run_id, export=True)
    with read_session(settings.database_url) as s:
        problem = guard.reader_problem(s, username, rec["run"]["institution"])
    if problem:
        raise guard.refuse(settings, user.id, "record.read", "sf_run", rec["run"]["id"], problem)
    return rec
