"""The service floor: the Prefect worker type ``sopflow`` (``prefect worker start --type sopflow``).

Prefect finds it through the ``prefect.collections`` entry point (pyproject.toml), which names
``flows.services.worker:SopflowWorker``; that module hands this class over on first use, so the
CLI's start-up never imports Prefect (tests/test_docs.py). This module is private for that reason
only: the class is the worker type's public face.

What Prefect gives it: the work pool (created with this type's job template when missing), the
worker's heartbeats and its status in the pool and the UI, labels on the runs it executes. What it
adds: the warm, in-process execution of ``flows.engine.executor`` (lanes of one process, claims
within milliseconds of a nudge) instead of ``BaseWorker``'s poll every ``PREFECT_WORKER_QUERY_SECONDS``
and its submission path (six more API calls and a ``Submitting`` state per resume), and the periodic
jobs of every floor (``flows.services.worker.floor_jobs``), each under its job lease.

Its job configuration has no environment: the worker runs flows in its own threads, which share
its own environment, so sopflow's settings (database URL with its password, data directory, API
URL, notification channels) come from the worker's environment, never from the deployment, and
nothing in Prefect's API or UI shows them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import anyio
from prefect.exceptions import InfrastructureNotAvailable
from prefect.workers.base import BaseJobConfiguration, BaseWorker, BaseWorkerResult
from pydantic import BaseModel, Field

from flows.config import Settings, get_settings
from flows.engine.deployment import WORKER_TYPE
from flows.engine.env import apply_prefect_env
from flows.errors import FlowsError
from flows.record.db import init_db
from flows.services.audit import checkpoint_job

__all__ = [
    "SopflowJobConfiguration",
    "SopflowVariables",
    "SopflowWorker",
    "SopflowWorkerResult",
    "change_control_sweep",
    "floor_jobs",
    "worker_settings",
]


def change_control_sweep(settings: Settings) -> int:
    """Issue versions whose change control completed, make due ones Effective, send reminders."""
    from flows.services.sweeps import sweep

    return sum(sweep(settings).values())


def floor_jobs() -> list[tuple[str, Any]]:
    """The periodic jobs of the floors above the engine, registered with every worker's executor
    (the engine never imports them)."""
    return [("change_control", change_control_sweep), ("audit_checkpoint", checkpoint_job)]


class _SuspendedIsNotAnError(logging.Filter):
    """Prefect logs every suspension at a human step as ERROR ("Finished in state Suspended"):
    that is how every gate waits, so it is logged here at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and "Finished in state Suspended" in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class SopflowJobConfiguration(BaseJobConfiguration):
    """A sopflow run needs no infrastructure of its own: it runs in a lane of the worker."""

    @classmethod
    def json_template(cls) -> dict[str, Any]:
        return {"name": "{{ name }}", "labels": "{{ labels }}"}


class SopflowVariables(BaseModel):
    """What a deployment of this type may set: a name and labels. No environment, on purpose."""

    name: str | None = Field(default=None, description="Name given to the run's execution in the worker's log.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels for the run's execution.")


class SopflowWorkerResult(BaseWorkerResult):
    """How a flow run the worker executed ended (0: completed or suspended at a human step)."""


def worker_settings() -> Settings:
    """sopflow's settings for a worker: its own environment; a worker started by ``prefect worker
    start`` talks to the Prefect server Prefect was configured for (``PREFECT_API_URL``) unless
    ``SOPFLOW_PREFECT_API_URL`` says otherwise."""
    if not os.environ.get("SOPFLOW_PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if api := PREFECT_API_URL.value():
            os.environ["SOPFLOW_PREFECT_API_URL"] = str(api)
    return apply_prefect_env(get_settings())


class SopflowWorker(BaseWorker[SopflowJobConfiguration, Any, SopflowWorkerResult]):
    type = WORKER_TYPE
    job_configuration = SopflowJobConfiguration
    job_configuration_variables = SopflowVariables  # deliberately no `env` (BaseVariables has one)
    _description = (
        "Runs sopflow's run-sop flow runs in warm threads of the worker process (a resume reaches the "
        "next step in a fraction of a second) and the periodic jobs of sopflow's floors; any sopflow "
        "worker takes over the runs of one that died. Reads sopflow's settings from its own environment."
    )

    def __init__(self, *args: Any, ready: Path | None = None, **kwargs: Any) -> None:
        if not kwargs.get("name"):  # Prefect's default is a UUID; operators want to know the machine
            kwargs["name"] = f"sopflow-{socket.gethostname()}-{os.getpid()}"
        super().__init__(*args, **kwargs)
        # Kept here rather than read back from BaseWorker's private attributes.
        self.pool_name: str = kwargs.get("work_pool_name") or args[0]
        self.max_runs: int = kwargs.get("limit") or 16
        self.ready = ready
        self.executor: Any = None

    async def setup(self) -> None:
        await super().setup()  # the pool (created with this type's template if missing), the first heartbeat
        logging.getLogger("prefect.flow_runs").addFilter(_SuspendedIsNotAnError())
        from flows.engine.executor import Executor

        settings = worker_settings()
        try:  # a database behind or ahead of the code: one line, exit 1, never a traceback
            await anyio.to_thread.run_sync(init_db, settings.database_url)
        except FlowsError as exc:
            logging.getLogger("sopflow.worker").error("sopflow worker not started: %s", exc)
            raise SystemExit(1) from None
        if self.ready is None:  # `prefect worker start`: say when it polls, where `sopflow server` would look
            from flows.services.server import ready_file

            self.ready = ready_file(settings)
        self.executor = await anyio.to_thread.run_sync(
            lambda: Executor(
                settings=settings,
                pool=self.pool_name,
                limit=self.max_runs,
                jobs=floor_jobs(),
                name=self.name,
            )
        )

    async def start(self, run_once: bool = False, with_healthcheck: bool = False, printer: Any = print) -> None:
        """Heartbeats through Prefect, claims and jobs through the executor, until cancelled."""
        from prefect.utilities.services import critical_service_loop

        async with self:
            serving = threading.Thread(target=self.executor.serve, args=(self.ready,), name="sopflow-claims")
            serving.start()
            printer(f"Worker {self.name!r} started on pool {self.pool_name!r} (type {self.type!r})")
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        lambda: critical_service_loop(
                            workload=self.sync_with_backend,
                            interval=self.heartbeat_interval_seconds,
                            run_once=run_once,
                            jitter_range=0.3,
                            backoff=4,
                        )
                    )
                    while serving.is_alive() and not run_once:
                        await anyio.sleep(0.2)
                    tg.cancel_scope.cancel()
            finally:
                self.executor.stop()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(serving.join, 120)
        printer(f"Worker {self.name!r} stopped")

    async def run(
        self, flow_run: Any, configuration: SopflowJobConfiguration, task_status: Any = None
    ) -> SopflowWorkerResult:
        """Execute one flow run in a lane of this worker and wait for it to suspend or end."""
        if task_status is not None:
            task_status.started(self.name)
        state = await anyio.to_thread.run_sync(self.executor.execute_and_wait, flow_run)
        failed = state is None or state.is_failed() or state.is_crashed()
        return SopflowWorkerResult(identifier=f"{self.name}/{flow_run.id}", status_code=1 if failed else 0)

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: SopflowJobConfiguration, grace_seconds: int = 30
    ) -> None:
        raise InfrastructureNotAvailable(
            "a sopflow run executes in a thread of its worker and is not killed from Prefect: its record in "
            "sopflow's database is the quality record (a run ends by its SOP: a rejection, a stop)"
        )
