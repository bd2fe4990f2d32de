"""Stage 2: sopflow's executor: a long-lived process that runs ``run-sop`` flow runs in threads.

Why not ``flow.serve``: a served flow starts a fresh Python process per run, so a resume waits
for the runner's poll plus a cold interpreter (about 2 s here). The executor polls the server
every ``SOPFLOW_POLL_SECONDS`` for scheduled runs of the ``run-sop/sopflow`` deployment, claims
one by proposing ``Pending`` (the server arbitrates between executors), and runs it in a thread
of this warm process with ``prefect.flow_engine.run_flow``.

Polling costs the server work even when nothing happens, so the interval adapts: it starts at
``SOPFLOW_POLL_SECONDS`` (50 ms), doubles while polls find nothing, up to
``SOPFLOW_POLL_MAX_SECONDS`` (1 s), and drops back when a run is claimed or when a process on
this machine nudges it (a UDP datagram to the port in ``run/executor.nudge``; ``start`` and
``submit`` send one after they schedule or resume a run). A nudged executor reaches the next step
as fast as a fast poll; an executor elsewhere finds the run within ``SOPFLOW_POLL_MAX_SECONDS``.

It also repairs what a crash leaves: runs claimed by an executor on this host whose process is
gone are rescheduled (every step is idempotent, so they re-enter safely), and a run whose step
was signed in sopflow's record while the resume never reached Prefect is resumed. The same
sweep (every 5 s) escalates human steps waiting past their time-out (``flows.engine.escalation``)
and opens deviations for deadlines past due (``flows.engine.deadlines``); the floors above add their
own periodic jobs (``jobs=``: change control's sweep), so the engine never imports them.

The process is ``python -m flows.services.worker`` (``sopflow server start`` starts it): it wires
this executor with every floor's jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.config import Settings
from flows.engine.client import resume_signed_runs
from flows.engine.deadlines import sweep_deadlines
from flows.engine.env import apply_prefect_env
from flows.engine.escalation import escalate_overdue
from flows.engine.nudge import nudge_file
from flows.engine.steps import set_run_status
from flows.engine.subruns import resume_ready
from flows.record.db import init_db, write_session

__all__ = ["DEPLOYMENT_NAME", "Executor", "Job", "ensure_deployment"]

DEPLOYMENT_NAME = "sopflow"
Job = tuple[str, Callable[[Settings], object]]
"""A periodic job the executor runs every sweep (every 5 s): its name (for the log) and the function.
The engine's own jobs come first; the floors above register theirs (``flows.services.worker``)."""
log = logging.getLogger("sopflow.executor")


def ensure_deployment() -> UUID:
    """The id of the ``run-sop/sopflow`` deployment, registering it when it does not exist.

    An existing one (e.g. deployed from prefect.yaml with a work pool) is left as it is: the
    executor and process workers can serve the same deployment; the server lets one claim a run.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.engine.run_sop import FLOW_NAME, run_sop

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}").id
        except ObjectNotFound:
            pass
    # to_deployment and apply are Prefect's sync_compatible: called from sync code they return values.
    deployment: Any = run_sop.to_deployment(name=DEPLOYMENT_NAME, description="sopflow: run one SOP revision")
    deployment_id: UUID = deployment.apply()
    return deployment_id


class Executor:
    def __init__(
        self, *, limit: int = 16, poll: float | None = None, jobs: Sequence[Job] = (), settings: Settings | None = None
    ) -> None:
        settings = apply_prefect_env(settings)
        from prefect.client.orchestration import get_client

        init_db(settings.database_url)

        self.settings = settings
        self.poll = settings.poll_seconds if poll is None else poll
        self.poll_max = max(self.poll, settings.poll_max_seconds)
        self.nudges = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.nudges.bind(("127.0.0.1", 0))
        self.nudges.setblocking(False)
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self.limit = limit
        self.pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="run-sop")
        self.running: dict[UUID, Future[None]] = {}
        self.stopping = threading.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.deployment_id = ensure_deployment()
        self._last_sweep = 0.0
        self.jobs: list[Job] = [
            ("recover_orphans", lambda _: self.recover_orphans()),
            ("resume_signed", lambda _: self.resume_signed()),
            ("resume_ready", lambda _: self.resume_ready()),
            ("escalate", lambda _: self.escalate()),
            ("deadlines", lambda _: self.deadlines()),
            *jobs,
        ]

    # -- claiming --------------------------------------------------------------------------
    def _scheduled(self, limit: int) -> list[Any]:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterNextScheduledStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.types._datetime import now

        return self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=now("UTC")),
            ),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
            limit=limit,
        )

    def _claim(self, flow_run_id: UUID) -> bool:
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.states import Pending

        result: Any = self.client.set_flow_run_state(flow_run_id, Pending())
        if result.status != SetStateStatus.ACCEPT:
            return False
        self.client.update_flow_run(flow_run_id, infrastructure_pid=self.owner)
        return True

    def _execute(self, flow_run_id: UUID) -> None:
        from prefect.flow_engine import run_flow

        from flows.engine.run_sop import run_sop

        run_id: str | None = None
        try:
            flow_run = self.client.read_flow_run(flow_run_id)
            run_id = flow_run.parameters.get("run_id")
            state: Any = run_flow(run_sop, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
            if asyncio.iscoroutine(state):
                state = asyncio.run(state)
            if state is not None and (state.is_failed() or state.is_crashed()):
                self._record_failure(
                    flow_run.parameters.get("run_id"), f"Prefect flow run {state.name}: {state.message}"
                )
        except Exception:
            # Typically the server went away mid-claim: give the run back so an executor retries it.
            log.exception("flow run %s raised; rescheduling it", flow_run_id)
            try:
                from prefect.states import Scheduled

                self.client.set_flow_run_state(flow_run_id, Scheduled(), force=True)
            except Exception:
                log.exception("could not reschedule %s; the orphan sweep will (run %s)", flow_run_id, run_id)
        finally:
            self.running.pop(flow_run_id, None)

    def _record_failure(self, run_id: str | None, detail: str) -> None:
        """Put an engine failure in sopflow's record, so `sopflow runs` does not say 'waiting' forever."""
        if not run_id:
            return

        try:
            with write_session(self.settings.database_url) as s:
                set_run_status(s, run_id, "failed", detail[:2000])
        except Exception:
            log.exception("could not record the failure of run %s", run_id)

    def poll_once(self) -> int:
        free = self.limit - len(self.running)
        claimed = 0
        if free <= 0:
            return 0
        for fr in self._scheduled(free):
            fr_id = fr.id
            if fr_id in self.running or not self._claim(fr_id):
                continue
            self.running[fr_id] = self.pool.submit(self._execute, fr_id)
            claimed += 1
        return claimed

    # -- repairs ---------------------------------------------------------------------------
    def recover_orphans(self) -> int:
        """Reschedule runs claimed on this host by an executor process that no longer exists."""
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Scheduled

        runs = self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))
            ),
        )
        host = socket.gethostname()
        n = 0
        for fr in runs:
            owner = fr.infrastructure_pid or ""
            h, _, pid = owner.partition(":")
            if h != host or fr.id in self.running:
                continue
            if owner != self.owner and pid.isdigit() and _pid_alive(int(pid)):
                continue
            log.warning("rescheduling flow run %s left by dead executor %s", fr.id, owner)
            self.client.set_flow_run_state(fr.id, Scheduled(), force=True)
            n += 1
        return n

    def resume_signed(self) -> int:
        """Resume suspended runs whose waiting step was signed while the resume was lost."""
        return resume_signed_runs(self.settings, self.client)

    def resume_ready(self) -> int:
        """Resume runs waiting on a sub-run that ended, or held by a quarantine that was lifted."""
        return resume_ready(self.settings, self.client)

    def escalate(self) -> int:
        """Tell the escalation role about human steps waiting past their time-out (once per waiting period)."""
        try:
            return escalate_overdue(self.settings)
        except Exception:  # a broken notify.yaml or one bad run must not stop the executor
            log.exception("escalation sweep failed; retrying at the next sweep")
            return 0

    def deadlines(self) -> int:
        """Open a deviation for each deadline now past due with its end not recorded (once per deadline and run)."""
        try:
            return sweep_deadlines(self.settings)
        except Exception:  # a broken run or database hiccup must not stop the executor
            log.exception("deadline sweep failed; retrying at the next sweep")
            return 0

    # -- loop --------------------------------------------------------------------------------
    def _wait_for_nudge(self, timeout: float) -> bool:
        """Sleep up to ``timeout``; True when nudged (drains every waiting datagram)."""
        ready, _, _ = select.select([self.nudges], [], [], timeout)
        nudged = False
        while ready:
            try:
                self.nudges.recv(64)
                nudged = True
            except BlockingIOError:
                break
        return nudged

    def serve(self, ready: Path | None = None) -> None:
        """Poll and sweep until ``stopping`` is set; writes its pid to ``ready`` once it listens."""
        self.recover_orphans()
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        nudge_file(self.settings).write_text(f"{self.nudges.getsockname()[1]}\n")
        if ready is not None:
            ready.write_text(f"{os.getpid()}\n")
        log.info("executor %s polling every %.3f-%.3f s", self.owner, self.poll, self.poll_max)
        interval = self.poll
        while not self.stopping.is_set():
            try:
                claimed = self.poll_once()
                if time.monotonic() - self._last_sweep > 5:
                    self._last_sweep = time.monotonic()
                    for name, job in self.jobs:
                        try:
                            job(self.settings)
                        except Exception:
                            log.exception("%s failed; the other sweeps go on", name)
            except Exception:  # the server may be restarting; keep trying
                log.exception("poll failed; retrying")
                claimed = 0
                self.stopping.wait(1.0)
            interval = self.poll if claimed else min(interval * 2, self.poll_max)
            if self._wait_for_nudge(interval):
                interval = self.poll
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.client.__exit__(None, None, None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
