"""Stage 2: the one deployment every sopflow worker serves, on the work pool it polls.

``run-sop/sopflow`` on the work pool ``sopflow`` (``SOPFLOW_WORK_POOL``), of the worker type
``sopflow`` (``flows.services.worker``). Nothing of a worker's configuration is in it: no database
URL, no password, no home path, no API URL. Each worker reads those from its own environment
(README, "Production path"), so the deployment (and Prefect's API and UI, which show it) carries
no secret. Its entry point is the module path, which every worker has installed; there is nothing
to pull.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from uuid import UUID

__all__ = ["DEPLOYMENT_NAME", "ENTRYPOINT", "WORKER_TYPE", "ensure_deployment", "pool_name"]

DEPLOYMENT_NAME = "sopflow"
ENTRYPOINT = "flows.engine.run_sop:run_sop"
WORKER_TYPE = "sopflow"
log = logging.getLogger("sopflow.deployment")


def pool_name() -> str:
    """The work pool sopflow's workers poll (``SOPFLOW_WORK_POOL``, default ``sopflow``)."""
    return os.environ.get("SOPFLOW_WORK_POOL") or "sopflow"


def ensure_deployment(client: Any, pool: str) -> UUID:
    """The id of ``run-sop/sopflow``, created on ``pool`` when it does not exist.

    An existing one is left as it is (e.g. made by ``prefect deploy`` from prefect.yaml), unless it
    names no work pool at all (made by an older sopflow): then it moves to ``pool``. One on another
    pool stays there: a worker of a second pool must not take the runs from the first. The pool
    must exist (a worker creates it when it starts).
    """
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    from flows.engine.run_sop import FLOW_NAME, run_sop

    try:
        found = client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT_NAME}")
        if found.work_pool_name:
            if found.work_pool_name != pool:
                log.warning(
                    "run-sop/sopflow is on work pool %r, not %r: this worker gets no runs", found.work_pool_name, pool
                )
            return found.id  # type: ignore[no-any-return]
    except ObjectNotFound:
        pass
    flow_id = client.create_flow_from_name(FLOW_NAME)
    deployment_id: UUID = client.create_deployment(
        flow_id=flow_id,
        name=DEPLOYMENT_NAME,
        description="sopflow: run one SOP revision; its parameters name sopflow's run, the record holds the rest",
        work_pool_name=pool,
        work_queue_name="default",
        entrypoint=ENTRYPOINT,
        parameter_openapi_schema=parameter_schema(run_sop).model_dump_for_openapi(),
        enforce_parameter_schema=False,
        pull_steps=[],
        job_variables={},
        tags=["sopflow"],
    )
    return deployment_id
