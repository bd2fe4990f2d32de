"""What bench/engine.py's parts share: the bench's institution and users, and small helpers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

INSTITUTION = "bench_hospital"
ROLE = "operator"
USER = "bench.user"
PASSWORD = "bench-password-1"  # noqa: S105 (a throw-away user in a temporary home)
CHECKS_SOP = "bench_checks"
BASE_SOP = "bench_base"
SIGNED_SOP = "bench_signed"
RUN_POLL = 0.010  # polling the run's status (part 1)
STEP_POLL = 0.005  # polling the next step's record (part 2)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))]


def ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"


def run_status(settings: Any, run_id: str) -> str | None:
    from sqlalchemy import text

    from flows.record.db import read_session

    with read_session(settings.database_url) as s:
        row = (
            s.connection()
            .execute(
                text("SELECT status, detail FROM sf_run_event WHERE run_id = :r ORDER BY n DESC LIMIT 1"), {"r": run_id}
            )
            .first()
        )
    if row is None:
        return None
    status, detail = row
    if status == "failed":
        raise RuntimeError(f"run {run_id} failed: {detail}")
    return str(status)


def step_status(settings: Any, run_id: str, step_id: str) -> str | None:
    from sqlalchemy import text

    from flows.record.db import read_session

    with read_session(settings.database_url) as s:
        row = (
            s.connection()
            .execute(
                text("SELECT status FROM sf_step_record WHERE run_id = :r AND step_id = :s ORDER BY n DESC LIMIT 1"),
                {"r": run_id, "s": step_id},
            )
            .first()
        )
    return None if row is None else str(row[0])


def wait_until(pred: Callable[[], bool], every: float, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not pred():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(every)
