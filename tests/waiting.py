"""Waiting for what a test needs, never for a fixed time: ``eventually`` polls until the event
happens and fails, naming it, only after a generous outer limit.

The engine works asynchronously (the worker claims runs, Prefect's task states arrive late), and
this machine is shared: a step that takes 0.2 s on an idle machine may take 20 s beside two
CPU-bound processes. So no test waits against a tight wall-clock deadline; the limit is there
to end a real hang. ``SOPFLOW_TEST_PATIENCE`` multiplies every limit (e.g. 3 on a slow host).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LIMIT", "eventually"]

T = TypeVar("T")

PATIENCE = float(os.environ.get("SOPFLOW_TEST_PATIENCE", "1"))
LIMIT = 240.0 * PATIENCE
"""Seconds before a wait gives up: far beyond what any event here takes, even on a busy machine."""


def eventually(
    probe: Callable[[], T | None], what: str | Callable[[], str], *, limit: float = LIMIT, every: float = 0.05
) -> T:
    """The first truthy value ``probe()`` returns, polling every ``every`` seconds; after ``limit``
    seconds, an AssertionError saying what never happened (``what``, or what it returns then)."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {limit:.0f} s: {what() if callable(what) else what}")
        time.sleep(every)
