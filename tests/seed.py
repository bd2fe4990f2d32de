"""Test set-up below the service floor: staff and training written straight through the record's
own writers (``flows.record.users``, ``flows.record.training``, the ledger), as fixtures.

The floor's rules for who may add users and record training (``flows.services.guard``) are
tested on their own in tests/test_accounts.py and tests/test_training.py; fixtures that need
staff at several institutions (each of whose first QA officer would need a QA officer there
already) seed them here instead, like a database restored from a backup. Every row is
audit-chained as usual; the actor is ``test-seed``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flows.config import Settings
from flows.record.db import init_db, write_session
from flows.record.tables import utcnow
from flows.record.training import record_training
from flows.record.users import add_user, find_user, grant_role

__all__ = ["SEED", "seed_training", "seed_user"]

SEED = "test-seed"


def seed_user(
    settings: Settings, username: str, printed_name: str, password: str, grants: Iterable[tuple[str, str]]
) -> str:
    """Create ``username`` with ``INSTITUTION:ROLE`` grants; returns the user's id."""
    init_db(settings.database_url)
    with write_session(settings.database_url) as s:
        user = add_user(s, username, printed_name, password, actor=SEED)
        for institution, role in grants:
            grant_role(s, user, institution, role, actor=SEED)
        return user.id


def seed_training(
    settings: Settings, username: str, institution: str, sop_id: str, version: int, trainer: str = "Test Trainer"
) -> None:
    """Record that ``username`` is trained on ``sop_id`` v``version`` at ``institution``."""
    with write_session(settings.database_url) as s:
        user = find_user(s, username)
        assert user is not None, f"no user {username!r} to train"
        record_training(s, user, institution, sop_id, version, trained_at=utcnow(), trainer=trainer, actor=SEED)
