"""Stage 2: the executor: the engine of a sopflow worker. It claims ``run-sop`` flow runs from its
work pool and runs them in warm lanes of this process, takes over the runs of workers that died,
and runs every floor's periodic jobs, each on one worker at a time.

Claiming: the executor polls ``get_scheduled_flow_runs_for_work_pool`` (the work pool's own
endpoint, which also tells the server the pool is polled) every ``SOPFLOW_POLL_SECONDS`` while
busy, backing off to ``SOPFLOW_POLL_MAX_SECONDS`` while idle, and at once when nudged
(``flows.engine.nudge``: UDP from this machine, ``NOTIFY`` through PostgreSQL from any). For each
scheduled run it takes the run's lease (``flows.engine.leases``), then proposes ``Pending`` (the
server lets exactly one worker's proposal through), then runs it in an idle lane
(``flows.engine.lanes``) with Prefect's flow engine (``prefect.flow_engine.run_flow``, the engine
Prefect's own workers run in their processes; there is no other public way to run an existing flow
run in this process). The lease is released once the run has suspended or ended.

A signer who arrives while the run is still on its way to suspending finds it Running and does not
wait (``flows.engine.client.resume``): as soon as a run suspends, the executor re-reads the record
and resumes it itself when its waiting step was signed meanwhile.

Failover: a flow run ``Pending`` or ``Running`` whose lease nobody holds was left by a worker that
died (``kill -9``, or a machine lost: its database session ends); ``recover_orphans`` reschedules it
and a worker, on any host, re-runs it from the top. Every step is idempotent by sopflow's record
and every notification goes through the outbox (``flows.engine.outbox``), so nothing is recorded or
sent twice.

Periodic jobs (every ``SWEEP_SECONDS``, in a thread of their own so a slow channel never delays a
claim): the engine's (recover orphans, repair lost resumes, resume runs whose sub-run ended,
escalations, deadlines, the outbox) and those the floors above register (``jobs=``: change
control's sweep). Each runs under its job lease: across any number of workers, one at a time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.config import Settings
from flows.engine.client import resume_if_signed, resume_signed_runs
from flows.engine.deadlines import sweep_deadlines
from flows.engine.deployment import ensure_deployment, pool_name
from flows.engine.env import apply_prefect_env
from flows.engine.escalation import escalate_overdue
from flows.engine.lanes import Lanes
from flows.engine.leases import job_key, leases_for, run_key
from flows.engine.nudge import Wakeup, nudge, nudge_file
from flows.engine.outbox import sweep_outbox
from flows.engine.steps import set_run_status
from flows.engine.subruns import resume_ready
from flows.record.db import init_db, write_session

__all__ = ["SWEEP_SECONDS", "Executor", "Job", "sweep_file"]

SWEEP_SECONDS = 5.0
Job = tuple[str, Callable[[Settings], object]]
"""A periodic job: its name (its lease is ``job:<name>``; the log names it too) and the function.
The engine's own jobs come first; the floors above register theirs (``flows.services.worker``)."""
log = logging.getLogger("sopflow.executor")


def sweep_file(settings: Settings) -> Path:
    """Where a worker writes how many sweeps it has made (``<count> <time of the last>``)."""
    return settings.run_dir / "executor.sweeps"


class Executor:
    def __init__(
        self,
        *,
        limit: int = 16,
        poll: float | None = None,
        jobs: Sequence[Job] = (),
        settings: Settings | None = None,
        pool: str | None = None,
        name: str | None = None,
    ) -> None:
        settings = apply_prefect_env(settings)
        from prefect.client.orchestration import get_client

        init_db(settings.database_url)
        self.settings = settings
        self.pool = pool or pool_name()
        self.name = name or f"sopflow {socket.gethostname()} {os.getpid()}"
        self.poll = settings.poll_seconds if poll is None else poll
        self.poll_max = max(self.poll, settings.poll_max_seconds)
        self.leases = leases_for(settings.database_url)
        self.wakeup = Wakeup(settings)
        self.client = get_client(sync_client=True)
        self.client.__enter__()
        self.deployment_id = ensure_deployment(self.client, self.pool)
        self.limit = limit
        self.lanes = Lanes(limit)
        self.running: dict[UUID, Future[Any]] = {}
        self.known: OrderedDict[str, Any] = OrderedDict()
        """Flow runs this worker executed lately, by id: one that is nudged is claimed at once."""
        self._guard = threading.RLock()  # a lane may finish (and call back) while a claim holds it
        self.stopping = threading.Event()
        self.jobs: list[Job] = [
            ("recover_orphans", lambda _: self.recover_orphans()),
            ("resume_signed", lambda s: resume_signed_runs(s, self._sweep_client)),
            ("resume_ready", lambda s: resume_ready(s, self._sweep_client)),
            ("escalate", escalate_overdue),
            ("deadlines", sweep_deadlines),
            ("outbox", lambda s: sweep_outbox(s, leases=self.leases)),
            *jobs,
        ]
        self._sweep_client: Any = None

    # -- claiming --------------------------------------------------------------------------
    def _scheduled(self) -> list[Any]:
        responses = self.client.get_scheduled_flow_runs_for_work_pool(self.pool, scheduled_before=datetime.now(UTC))
        return [r.flow_run for r in responses]

    def _claim(self, fr: Any) -> bool:
        """Take the run's lease, then propose Pending; the server lets one worker's proposal through."""
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.states import Pending

        key = run_key(fr.id)
        if not self.leases.try_hold(key):
            return False
        try:
            result: Any = self.client.set_flow_run_state(fr.id, Pending())
            if result.status != SetStateStatus.ACCEPT:
                self.leases.release(key)
                return False
            fr.state = result.state  # what the engine starts from, as after a poll and a claim
        except BaseException:
            self.leases.release(key)
            raise
        labels: dict[str, bool | int | float | str] = {
            "prefect.worker.name": self.name,
            "prefect.worker.type": "sopflow",
            "prefect.work-pool.name": self.pool,
        }
        if any((fr.labels or {}).get(k) != v for k, v in labels.items()):
            try:  # which worker runs it, for the UI; once per run and worker
                self.client.update_flow_run_labels(fr.id, labels)
            except Exception:
                log.warning("could not label flow run %s", fr.id, exc_info=True)
        return True

    def claim_named(self, ids: set[str]) -> int:
        """Claim, without polling the pool, the nudged flow runs this worker executed last; the
        server arbitrates as for any claim (it lets through one proposal of Pending)."""
        claimed = 0
        for fr_id in ids:
            with self._guard:
                fr = self.known.get(fr_id)
                if fr is None or fr.id in self.running or self.lanes.free <= 0:
                    continue
            if self._claim(fr):
                self._start(fr)
                claimed += 1
        return claimed

    def poll_once(self) -> int:
        if self.lanes.free <= 0:
            return 0
        claimed = 0
        for fr in self._scheduled():
            if self.lanes.free <= 0:
                break
            with self._guard:
                if fr.id in self.running:
                    continue
            if not self._claim(fr):
                continue
            self._start(fr)
            claimed += 1
        return claimed

    def _start(self, fr: Any) -> Future[Any]:
        def done(f: Future[Any]) -> None:
            with self._guard:
                self.running.pop(fr.id, None)
            self.leases.release(run_key(fr.id))
            state = None if f.cancelled() or f.exception() else f.result()
            with self._guard:
                if state is not None and state.is_paused():  # it will be resumed: keep it at hand
                    self.known[str(fr.id)] = fr
                    self.known.move_to_end(str(fr.id))
                    while len(self.known) > 1000:
                        self.known.popitem(last=False)
                else:
                    self.known.pop(str(fr.id), None)

        with self._guard:
            future = self.lanes.run(lambda: self._execute(fr), done)
            if future is None:  # no lane after all: give the run back
                from prefect.states import Scheduled

                self.client.set_flow_run_state(fr.id, Scheduled(), force=True)
                self.leases.release(run_key(fr.id))
                raise RuntimeError("no free lane")
            self.running[fr.id] = future
        return future

    def execute_and_wait(self, fr: Any) -> Any:
        """Claim and run one flow run now, in a lane; returns its final or suspended state (for
        ``BaseWorker.run``)."""
        if not self._claim(fr):
            return None
        return self._start(fr).result()

    async def _execute(self, fr: Any) -> Any:
        from prefect.exceptions import Pause
        from prefect.flow_engine import run_flow

        from flows.engine.run_sop import run_sop

        run_id = fr.parameters.get("run_id")
        try:
            try:
                state: Any = run_flow(run_sop, flow_run=fr, parameters=fr.parameters, return_type="state")
                if hasattr(state, "__await__"):
                    state = await state
            except Pause as exc:  # a suspension leaves Prefect's engine as this signal, carrying the state
                state = getattr(exc, "state", None)
            if state is not None and state.is_paused() and run_id:
                # The signer may have signed while the run was on its way to suspending.
                from prefect.context import SyncClientContext

                ctx = SyncClientContext.get()
                if ctx is not None and resume_if_signed(self.settings, ctx.client, str(fr.id), run_id):
                    nudge(self.settings, fr.id)
            if state is not None and (state.is_failed() or state.is_crashed()):
                self._record_failure(run_id, f"Prefect flow run {state.name}: {state.message}")
            return state
        except Exception:
            # Typically the server went away mid-run: give the run back so a worker retries it.
            log.exception("flow run %s raised; rescheduling it", fr.id)
            try:
                from prefect.states import Scheduled

                self.client.set_flow_run_state(fr.id, Scheduled(), force=True)
            except Exception:
                log.exception("could not reschedule %s; the orphan sweep will (run %s)", fr.id, run_id)
            return None

    def _record_failure(self, run_id: str | None, detail: str) -> None:
        """Put an engine failure in sopflow's record, so `sopflow runs` does not say 'waiting' forever."""
        if not run_id:
            return
        try:
            with write_session(self.settings.database_url) as s:
                set_run_status(s, run_id, "failed", detail[:2000])
        except Exception:
            log.exception("could not record the failure of run %s", run_id)

    # -- failover ----------------------------------------------------------------------------
    def recover_orphans(self) -> int:
        """Reschedule flow runs Pending or Running under no lease: their worker died."""
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Scheduled

        client = self._sweep_client or self.client
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))
            ),
        )
        n = 0
        for fr in runs:
            key = run_key(fr.id)
            with self.leases.hold(key, owner="job:recover_orphans") as free:
                if not free:
                    continue  # a worker (maybe this one) is executing it
                # Read again under the lease: it may have suspended or ended since the list was read.
                state = client.read_flow_run(fr.id).state
                if state is None or state.type not in (StateType.PENDING, StateType.RUNNING):
                    continue
                log.warning("taking over flow run %s (%s): its worker is gone", fr.id, fr.name)
                client.set_flow_run_state(fr.id, Scheduled(name="Rescheduled"), force=True)
                n += 1
        if n:
            nudge(self.settings)
        return n

    # -- periodic jobs ----------------------------------------------------------------------
    def sweep_once(self) -> dict[str, object]:
        """Run every job whose lease this worker gets now (the others are being run elsewhere)."""
        done: dict[str, object] = {}
        for name, job in self.jobs:
            if self.stopping.is_set():
                break
            with self.leases.hold(job_key(name)) as mine:
                if not mine:
                    continue
                try:
                    done[name] = job(self.settings)
                except Exception:  # a broken notify.yaml or one bad run must not stop the others
                    log.exception("%s failed; the other jobs go on", name)
        return done

    def _sweeper(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            self._sweep_client = client
            sweeps = 0
            while not self.stopping.wait(SWEEP_SECONDS):
                if not self.leases.alive():
                    log.error("the lease connection is gone; this worker stops")
                    self.stopping.set()
                    break
                self.sweep_once()
                sweeps += 1
                # How many sweeps this worker has made, and when the last ended (for status and tests).
                sweep_file(self.settings).write_text(f"{sweeps} {datetime.now(UTC).isoformat()}\n")

    # -- loop --------------------------------------------------------------------------------
    def serve(self, ready: Path | None = None) -> None:
        """Claim and sweep until ``stopping`` is set; writes its pid to ``ready`` once it polls."""
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        nudge_file(self.settings).write_text(f"{self.wakeup.port}\n")
        sweeper = threading.Thread(target=self._sweeper, name="sopflow-sweeper", daemon=True)
        sweeper.start()
        if ready is not None:
            ready.write_text(f"{os.getpid()}\n")
        log.info("worker %s on pool %s polling every %.3f-%.3f s", self.name, self.pool, self.poll, self.poll_max)
        interval = self.poll
        named: set[str] = set()
        while not self.stopping.is_set():
            try:
                claimed = self.claim_named(named) if named else 0
                claimed += self.poll_once()
            except Exception:  # the server may be restarting; keep trying
                log.exception("poll failed; retrying")
                claimed = 0
                self.stopping.wait(1.0)
            interval = self.poll if claimed else min(interval * 2, self.poll_max)
            nudges = self.wakeup.wait(interval)
            named = {n for n in nudges or () if n != "poll"}
            if nudges:
                interval = self.poll
        sweeper.join(timeout=60)
        self.lanes.stop(wait=True)
        self.wakeup.close()
        self.client.__exit__(None, None, None)

    def stop(self) -> None:
        self.stopping.set()
        nudge(self.settings)  # wake the claim loop now
