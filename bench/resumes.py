"""Part 2 of bench/engine.py: signed submit -> next step waiting, and where each resume's time goes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from bench.common import INSTITUTION, PASSWORD, SIGNED_SOP, STEP_POLL, USER, run_status, step_status, wait_until


def time_authenticate(settings: Any, times: int = 7) -> list[float]:
    from flows.record.accounts import authenticate
    from flows.record.db import read_session

    out = []
    for _ in range(times):
        with read_session(settings.database_url) as s:
            t0 = time.perf_counter()
            authenticate(s, USER, PASSWORD)
            out.append(time.perf_counter() - t0)
    return out


def wait_waiting(settings: Any, run_id: str, step_id: str) -> None:
    wait_until(
        lambda: step_status(settings, run_id, step_id) == "waiting", STEP_POLL, 60, f"step {step_id} not waiting"
    )


def part2(settings: Any, k: int) -> dict[str, Any]:
    from flows.services.runs import start_run
    from flows.services.signing import submit_step

    steps = [f"r{i:03d}" for i in range(k + 1)]
    t_start = time.perf_counter()
    run_id = start_run(settings, INSTITUTION, SIGNED_SOP, {}, USER, PASSWORD).run_id
    wait_waiting(settings, run_id, steps[0])
    first_wait = time.perf_counter() - t_start
    latency, call, resumed, load = [], [], [], []
    for i in range(k):
        load.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        res = submit_step(settings, run_id, steps[i], USER, PASSWORD, {"v": str(i)})
        t1 = time.perf_counter()
        wait_waiting(settings, run_id, steps[i + 1])
        latency.append(time.perf_counter() - t0)
        call.append(t1 - t0)
        resumed.append(res.resumed)
    t0 = time.perf_counter()
    submit_step(settings, run_id, steps[k], USER, PASSWORD, {"v": str(k)})
    wait_until(lambda: run_status(settings, run_id) == "completed", STEP_POLL, 60, "signed run not completed")
    last = time.perf_counter() - t0
    return {
        "latency": latency,
        "call": call,
        "resumed": resumed,
        "load": load,
        "first_wait": first_wait,
        "last": last,
        "phases": resume_phases(settings, run_id, steps),
    }


def resume_phases(settings: Any, run_id: str, steps: list[str]) -> dict[str, list[float]]:
    """Where each resume's time went, from Prefect's state history and sopflow's step records."""
    from datetime import UTC, datetime
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from sqlalchemy import text

    from flows.record.db import read_session

    def utc(t: Any) -> datetime:
        t = datetime.fromisoformat(t) if isinstance(t, str) else t
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t

    with read_session(settings.database_url) as s:
        conn = s.connection()
        fr_id = conn.execute(text("SELECT flow_run_id FROM sf_run WHERE id = :r"), {"r": run_id}).scalar_one()
        recs = [
            (st, status, utc(at))
            for st, status, at in conn.execute(
                text("SELECT step_id, status, at FROM sf_step_record WHERE run_id = :r ORDER BY n"), {"r": run_id}
            )
        ]
    with get_client(sync_client=True) as client:
        states = sorted((utc(st.timestamp), st.name) for st in client.read_flow_run_states(UUID(fr_id)))

    def first(after: Any, pred: Callable[[tuple[Any, str]], bool], seq: list[Any]) -> Any:
        return next((x for x in seq if x[0] >= after and pred(x)), None)

    names = (
        "signed->Resuming",
        "Resuming->Pending (claim)",
        "Pending->Running",
        "Running->step done",
        "step done->next waiting",
    )
    out: dict[str, list[float]] = {k: [] for k in names}
    for i in range(len(steps) - 1):
        signed = next((at for st, status, at in recs if st == steps[i] and status == "signed"), None)
        done = next((at for st, status, at in recs if st == steps[i] and status == "done"), None)
        waiting = next((at for st, status, at in recs if st == steps[i + 1] and status == "waiting"), None)
        if None in (signed, done, waiting):
            continue
        resuming = first(signed, lambda x: x[1] == "Resuming", states)
        pending = resuming and first(resuming[0], lambda x: x[1] == "Pending", states)
        running = pending and first(pending[0], lambda x: x[1] == "Running", states)
        if not running:
            continue
        marks = [signed, resuming[0], pending[0], running[0], done, waiting]
        for name, a, b in zip(names, marks, marks[1:], strict=False):
            out[name].append((b - a).total_seconds())
    return out
