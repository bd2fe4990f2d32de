"""Part 1 of bench/engine.py: per-step overhead, sopflow against plain Prefect tasks."""

from __future__ import annotations

import time
from typing import Any

from bench.common import BASE_SOP, CHECKS_SOP, INSTITUTION, PASSWORD, RUN_POLL, USER, median, run_status, wait_until


def time_sopflow(settings: Any, sop_id: str, n_steps: int) -> float:
    from flows.services.runs import start_run

    t0 = time.perf_counter()
    started = start_run(settings, INSTITUTION, sop_id, {"n": "1"}, USER, PASSWORD)
    run_id = started.run_id
    wait_until(
        lambda: run_status(settings, run_id) == "completed", RUN_POLL, 120, f"sopflow run {run_id} not completed"
    )
    elapsed = time.perf_counter() - t0
    wait_task_runs(started.flow_run_id, n_steps)  # untimed: let the server catch up before the next run
    return elapsed


def make_plain_flows() -> tuple[Any, Any]:
    """Two async flows of N trivial tasks: sync tasks called directly (run-sop's pattern), and the
    same inside one ``SyncClientContext`` (otherwise Prefect builds a new sync API client, SSL
    context included, for every sync task called from an async flow)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import SyncClientContext
    from prefect.runtime import flow_run

    # The same task options as run-sop's step task: no cache, no persisted result.
    @task(name="plain-step", cache_policy=NO_CACHE, persist_result=False)
    def plain_step(i: int) -> int:
        return i

    # Async flows, like run-sop: Prefect joins the heartbeat thread of sync flows only (~1 s late).
    @flow(name="bench-plain", persist_result=False)
    async def plain_flow(n: int) -> str:
        for i in range(n):
            plain_step.with_options(task_run_name=f"plain/{i}")(i)
        return str(flow_run.id)

    @flow(name="bench-plain-client", persist_result=False)
    async def plain_flow_client(n: int) -> str:
        with SyncClientContext.get_or_create():
            for i in range(n):
                plain_step.with_options(task_run_name=f"plain/{i}")(i)
        return str(flow_run.id)

    return plain_flow, plain_flow_client


def wait_task_runs(flow_run_id: str, n: int) -> None:
    """Wait until the server has recorded N completed task runs of a flow run (states arrive asynchronously)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:

        def recorded() -> bool:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED]))
                ),
                limit=n + 1,
            )
            return len(runs) >= n

        wait_until(recorded, 0.05, 120, f"task runs of {flow_run_id} not recorded")


def time_prefect(plain_flow: Any, n: int, settle: list[float] | None = None) -> float:
    """Time one plain flow; then wait (untimed) until the server has recorded its N completed task
    runs: task-run states reach the server asynchronously, and a backlog would slow the next run."""
    import asyncio

    t0 = time.perf_counter()
    fr_id = asyncio.run(plain_flow(n))
    elapsed = time.perf_counter() - t0
    wait_task_runs(fr_id, n)
    if settle is not None:
        settle.append(time.perf_counter() - t0 - elapsed)
    return elapsed


def part1(settings: Any, n: int, repeats: int) -> dict[str, Any]:
    plain, plain_ctx = make_plain_flows()
    # Warm-up (not counted): first imports, client connections, the SOP version row, Prefect's flow rows.
    time_sopflow(settings, BASE_SOP, 1)
    time_sopflow(settings, CHECKS_SOP, n)
    for f in (plain, plain_ctx):
        time_prefect(f, 0)
        time_prefect(f, n)
    r: dict[str, list[float]] = {k: [] for k in ("sf_base", "sf_n", "pf_base", "pf_n", "pc_base", "pc_n", "settle")}
    for _ in range(repeats):  # interleaved, so drift hits all alike
        r["sf_base"].append(time_sopflow(settings, BASE_SOP, 1))
        r["sf_n"].append(time_sopflow(settings, CHECKS_SOP, n))
        r["pf_base"].append(time_prefect(plain, 0))
        r["pf_n"].append(time_prefect(plain, n, r["settle"]))
        r["pc_base"].append(time_prefect(plain_ctx, 0))
        r["pc_n"].append(time_prefect(plain_ctx, n, r["settle"]))
    out: dict[str, Any] = dict(r)
    out["sf_step"] = (median(r["sf_n"]) - median(r["sf_base"])) / max(1, n - 1)  # the baseline SOP has one step
    out["pf_step"] = (median(r["pf_n"]) - median(r["pf_base"])) / n
    out["pc_step"] = (median(r["pc_n"]) - median(r["pc_base"])) / n
    return out
