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
from flows.errors import NotFoundError
from flows.record.db import read_session
from flows.record.tables import SopRun
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
        AuthenticationError, NotFoundError (``guard.NO_SUCH_RUN``: no such run, or not one they may read; a
        refusal is audited, ``record.read.refused``)
    """
    user = guard.sign_in(settings, username, password, f"read record {run_id}")
    with read_session(settings.database_url) as s:
        # A whole id of a run elsewhere is a refusal, audited; a prefix counts only the reader's runs.
        run = s.get(SopRun, run_id) or guard.lookup_run(s, run_id, among=guard.institutions_of(s, user.id))
        problem = guard.reader_problem(s, username, run.institution) if run is not None else None
    if run is not None and problem:
        guard.refuse(settings, user.id, "record.read", "sf_run", run.id, problem)  # audited, then answered as
    if run is None or problem:  # if there were no such run
        raise NotFoundError(guard.NO_SUCH_RUN)
    return runs.quality_record(settings, run.id, export=True)  # an export: it carries a signed checkpoint
