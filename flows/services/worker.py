"""The service floor: the sopflow worker, a Prefect worker type of its own.

``prefect worker start --type sopflow --pool sopflow`` on as many machines as needed, or
``python -m flows.services.worker`` (what ``sopflow server start`` starts for the embedded
default): both run ``SopflowWorker`` (``flows.services._worker_type``), which executes ``run-sop``
flow runs in the engine's warm executor (``flows.engine.executor``) together with every floor's
periodic jobs: the engine's own (take over runs of dead workers, repair lost resumes, escalations,
deadlines, the outbox) and this floor's change-control sweep (``flows.services.sweeps``), which
the engine never imports. Each job runs on one worker at a time (its lease).

Importing this module does not import Prefect (the CLI imports the floor on start-up):
``SopflowWorker`` is handed over on first use (Prefect's ``prefect.collections`` entry point
names ``flows.services.worker:SopflowWorker``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from flows.config import Settings
from flows.errors import FlowsError
from flows.record.db import init_db
from flows.services.server import ready_file

if TYPE_CHECKING:
    from flows.services._worker_type import SopflowWorker

# The periodic jobs of the floors above the engine: ``flows.services._worker_type.floor_jobs``.

__all__ = ["SopflowWorker", "deploy", "main"]

log = logging.getLogger("sopflow.worker")


def __getattr__(name: str) -> Any:
    if name == "SopflowWorker":  # Prefect's entry point, and the worker process below
        from flows.services._worker_type import SopflowWorker

        return SopflowWorker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def deploy(settings: Settings) -> dict[str, str]:
    """Create (or keep) the work pool of type ``sopflow`` and the ``run-sop/sopflow`` deployment on it
    (``sopflow server deploy``). Neither carries anything of this machine's configuration: no
    database URL, password, home or API URL (workers read those from their own environment).

    Raises:
        EngineError: the Prefect server cannot be reached.
    """
    from flows.engine.env import apply_prefect_env

    apply_prefect_env(settings)  # before the first Prefect import in this process
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from flows.engine.deployment import ensure_deployment, pool_name
    from flows.errors import EngineError
    from flows.services._worker_type import SopflowWorker

    pool = pool_name()
    try:
        with get_client(sync_client=True) as client:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type=SopflowWorker.type,
                        base_job_template=SopflowWorker.get_default_base_job_template(),
                        description="sopflow workers: `prefect worker start --type sopflow --pool " + pool + "`",
                    )
                )
            deployment_id = ensure_deployment(client, pool)
    except httpx.HTTPError as exc:
        raise EngineError(f"the Prefect server at {settings.api_url} cannot be reached: {exc}") from exc
    return {"work_pool": pool, "deployment": "run-sop/sopflow", "deployment_id": str(deployment_id)}


def main() -> None:
    """The local worker process (``sopflow server start``): pool ``SOPFLOW_WORK_POOL`` (``sopflow``)."""
    import asyncio
    import signal

    from flows.engine.env import apply_prefect_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.INFO if os.environ.get("SOPFLOW_TRACE_HTTP") else logging.WARNING)
    settings = apply_prefect_env()
    try:  # a database behind or ahead of the code: one line in the log, exit 1, no traceback
        init_db(settings.database_url)
    except FlowsError as exc:
        log.error("sopflow worker not started: %s", exc)
        sys.exit(1)
    # Prefect reads its settings when it is imported: the worker (which imports it) comes after them.
    from flows.engine.deployment import pool_name
    from flows.services._worker_type import SopflowWorker

    worker = SopflowWorker(work_pool_name=pool_name(), ready=ready_file(settings))

    async def serve() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
        with contextlib.suppress(asyncio.CancelledError):
            await worker.start(printer=log.info)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
