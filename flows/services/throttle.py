"""The service floor: how often a client may fail to sign in (``guard.sign_in`` asks here). State
is in sopflow's database (``SignInThrottle``), so every web process sees the same counts and a
restart forgets nothing. Times are wall-clock seconds (``time.time``): processes on several hosts
compare them.

Two counts, each a row keyed by what it counts:

    pair:<user> <client>   consecutive failed sign-ins of one account (known or not) from one
                           client; a success from that client ends it, and so do an unlock and a
                           password change of the account (``forget_account``). From
                           ``threshold`` failures on, the client waits before it may try that
                           account again: ``backoff`` seconds, doubling with each further
                           failure, at most ``CAP`` seconds.
    client:<client>        failed sign-ins from one client, whatever the account; it starts
                           again after ``WINDOW`` seconds without a failure (a success does not
                           end it: an attacker may own an account). From ``client_limit`` on,
                           the client waits as above, for every account.

A client that must wait is refused before its password is checked (no argon2 spent, nothing
counted). Which of them a sign-in counts in, and what reaching the threshold does (a wait, or the
account's lock), ``guard.sign_in`` decides; this module only counts.
"""

from __future__ import annotations

import math

from sqlalchemy import delete
from sqlmodel import Session, col

from flows.record.tables import SignInThrottle

__all__ = ["CAP", "WINDOW", "client_key", "count_failure", "forget", "forget_account", "pair_key", "wait_for"]

CAP = 3600.0
"""The longest wait (seconds) after failed sign-ins, however many there were."""
WINDOW = 3600.0
"""A client's count (all accounts) starts again after this many seconds without a failure."""


def pair_key(username: str, client: str) -> str:
    return f"pair:{username} {client}"


def client_key(client: str) -> str:
    return f"client:{client}"


def wait_for(session: Session, keys: list[str], now: float) -> float:
    """Seconds the longest block among ``keys`` still lasts (0 when none blocks)."""
    waits = [
        row.blocked_until - now
        for key in keys
        if (row := session.get(SignInThrottle, key)) is not None and row.blocked_until is not None
    ]
    return max([w for w in waits if w > 0], default=0.0)


def count_failure(
    session: Session, key: str, now: float, *, limit: int, backoff: float, window: float | None = None
) -> int:
    """Count a failure under ``key`` (inside a write session); from ``limit`` failures on, block the
    key for ``backoff * 2**(failures - limit)`` seconds (at most ``CAP``). ``window``: a count whose
    last failure is older than this starts again. Returns the count."""
    row = session.get(SignInThrottle, key)
    if row is None:
        row = SignInThrottle(key=key, failures=0, first_at=now, last_at=now)
    elif window is not None and now - row.last_at > window:
        row.failures, row.first_at, row.blocked_until = 0, now, None
    row.failures += 1
    row.last_at = now
    if row.failures >= limit:
        row.blocked_until = now + min(CAP, backoff * math.pow(2, min(row.failures - limit, 32)))
    session.add(row)
    session.flush()
    return row.failures


def forget(session: Session, key: str) -> None:
    """End the count under ``key`` (a success)."""
    session.exec(delete(SignInThrottle).where(col(SignInThrottle.key) == key))


def forget_account(session: Session, username: str) -> None:
    """End every client's count of ``username`` (an unlock, a new password)."""
    session.exec(delete(SignInThrottle).where(col(SignInThrottle.key).startswith(f"pair:{username} ")))
