"""Stage 2: a test seam shipped with the engine: stop this process dead at a named point.

``SOPFLOW_FAULT=<action>@<point>[:<prefix>]`` makes the worker, when it reaches ``point`` with a
subject starting with ``prefix``, either ``kill`` itself (``SIGKILL``: no cleanup, no ``finally``,
exactly as a power cut or ``kill -9``) or ``stall`` (sleep for good, so a test can kill it from
outside mid-step). Points: ``outbox.before_record``, ``outbox.before_delivery``,
``outbox.after_delivery`` (subject: the notification's idempotency key) and ``step.start``
(subject: ``<sop>/<step>``). Unset, every call is one dictionary lookup. The tests of exactly-once
delivery and of failover use it (tests/test_outbox.py, tests/test_failover.py); nobody sets it in
production. Stdlib only.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import cache

__all__ = ["fault_point"]


@cache
def _spec() -> tuple[str, str, str] | None:
    raw = os.environ.get("SOPFLOW_FAULT", "").strip()
    if not raw or "@" not in raw:
        return None
    action, _, rest = raw.partition("@")
    point, _, prefix = rest.partition(":")
    return action, point, prefix


def fault_point(point: str, subject: str = "") -> None:
    """Die (or stall) here when ``SOPFLOW_FAULT`` names this point and the subject matches."""
    spec = _spec()
    if spec is None or spec[1] != point or not subject.startswith(spec[2]):
        return
    sys.stderr.write(f"SOPFLOW_FAULT: {spec[0]} at {point} {subject}\n")
    sys.stderr.flush()
    if spec[0] == "stall":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
