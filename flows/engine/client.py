"""Stage 2: what the service layer asks of Prefect: create a run's flow run, resume it, read its state.

Prefect is imported inside the functions: the CLI imports this module on paths that never
touch Prefect. Prefect's errors are translated into ``EngineError`` here.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from uuid import UUID

from flows.config import Settings
from flows.engine.env import apply_prefect_env
from flows.engine.nudge import nudge
from flows.errors import EngineError
from flows.record.db import read_session
from flows.record.state import signed_but_suspended, step_states

__all__ = [
    "api_client",
    "create_flow_run",
    "pause_key_prefix",
    "release_flow_run",
    "resume",
    "resume_if_signed",
    "resume_signed_runs",
]

log = logging.getLogger("sopflow.executor")

DEPLOYMENT = "run-sop/sopflow"
_HOLD = timedelta(seconds=60)
"""A new flow run waits this long for its record: if ``start`` dies before releasing it, a worker
picks it up then anyway (and the flow fails, saying so, when no record was written)."""


def api_client(settings: Settings) -> Any:
    """This process's one sync Prefect client for the API URL, as a context manager that does not
    close it (building one costs 40-100 ms: CA bundle)."""
    apply_prefect_env(settings)
    return contextlib.nullcontext(_open_client(settings.api_url))  # shared: `with` must not close it


@cache
def _open_client(api_url: str) -> Any:
    from prefect.client.orchestration import get_client

    client = get_client(sync_client=True)  # honours PREFECT_API_KEY / PREFECT_API_AUTH_STRING too
    if str(client.api_url).rstrip("/") != api_url.rstrip("/"):
        raise EngineError(f"Prefect was configured for {client.api_url} before sopflow set {api_url} in this process")
    client.__enter__()
    return client


def _deployment_id(client: Any) -> UUID:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(DEPLOYMENT).id  # type: ignore[no-any-return]
    except ObjectNotFound:
        raise EngineError(
            f"the Prefect deployment {DEPLOYMENT!r} does not exist yet: start a worker (`sopflow server start`, or "
            "`prefect worker start --type sopflow --pool sopflow`) or run `sopflow server deploy`"
        ) from None


def create_flow_run(
    settings: Settings,
    run_id: str,
    name: str,
    *,
    tags: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
) -> str:
    """Create the flow run for a new sopflow run, held until ``release_flow_run``.

    The flow run exists before sopflow's record of the run (which must name it), and no
    worker may start it before that record is committed: it is created scheduled far in the
    future, and released once the record is written. ``name``, ``tags`` and ``parameters`` are
    what operators see (``flows.engine.operators``); the flow reads only ``run_id``.
    """
    apply_prefect_env(settings)  # before the first Prefect import in this process
    import httpx
    from prefect.states import Scheduled

    try:
        with api_client(settings) as client:
            dep = _deployment_id(client)
            fr = client.create_flow_run_from_deployment(
                dep,
                parameters=parameters or {"run_id": run_id},
                name=name,
                tags=tags,
                idempotency_key=f"sopflow-run-{run_id}",
                state=Scheduled(scheduled_time=datetime.now(UTC) + _HOLD, name="AwaitingRecord"),
            )
            return str(fr.id)
    except httpx.HTTPError as exc:
        raise EngineError(
            f"the Prefect server at {settings.api_url} cannot be reached: {exc}; "
            "`sopflow server start` starts the local one"
        ) from exc


def release_flow_run(settings: Settings, flow_run_id: str, *, cancel: bool = False) -> None:
    """Let an executor pick up a held flow run now (or cancel it when the record could not be written)."""
    apply_prefect_env(settings)  # before the first Prefect import in this process
    import httpx
    from prefect.exceptions import PrefectException
    from prefect.states import Cancelled, Scheduled

    try:
        with api_client(settings) as client:
            client.set_flow_run_state(UUID(flow_run_id), Cancelled() if cancel else Scheduled(), force=True)
    except (httpx.HTTPError, PrefectException) as exc:
        if cancel:
            return
        raise EngineError(
            f"the run is recorded, but Prefect at {settings.api_url} could not be told to start it now ({exc}); "
            f"an executor starts it within {_HOLD.seconds} s of its creation"
        ) from exc
    if not cancel:
        nudge(settings)


def pause_key_prefix(step_id: str) -> str:
    """Prefect pause keys allow only [a-z0-9-]; step ids are [a-z0-9_], a repetition's ``<step>#<n>``."""
    return step_id.replace("_", "-").replace("#", "--r") + "-"


def _paused_at(state: Any, step_id: str) -> bool:
    key = state.state_details.pause_key if state is not None and state.is_paused() else None
    prefix = pause_key_prefix(step_id)
    return bool(key) and str(key).startswith(prefix) and str(key)[len(prefix) :].isdigit()


def resume(settings: Settings, flow_run_id: str, step_id: str, signature_id: str) -> bool:
    """Resume a suspended flow run with a signature reference; True when Prefect accepted it.

    No waiting: the gate records "waiting" just before it suspends, so a quick signer can arrive
    while the run is still Running. Then this returns False at once, and the worker resumes the
    run itself as soon as it has suspended (it re-reads the record then: ``flows.engine.executor``);
    the signature is in the record either way, and the worker's sweep repairs a lost resume.
    """
    apply_prefect_env(settings)  # before the first Prefect import in this process
    import httpx
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import PrefectException

    try:
        with api_client(settings) as client:
            # No read of the run's state first: the server refuses a resume of a run that is not
            # paused, and the gate re-checks everything against the record anyway.
            response = client.resume_flow_run(UUID(flow_run_id), run_input={"signature_id": signature_id})
        accepted = bool(response.status == SetStateStatus.ACCEPT)
        if accepted:
            nudge(settings, flow_run_id)
        return accepted
    except (httpx.HTTPError, PrefectException):
        return False


def resume_if_signed(settings: Settings, client: Any, flow_run_id: str, run_id: str) -> bool:
    """Resume a run that just suspended at a step signed meanwhile (its signer found it still
    Running, so their resume did not happen); True when it was resumed."""
    with read_session(settings.database_url) as s:
        signed = [(sid, rec.signature_id) for sid, rec in step_states(s, run_id).items() if rec.status == "signed"]
    if not signed:
        return False
    state = client.read_flow_run(UUID(flow_run_id)).state
    for step_id, signature_id in signed:
        if _paused_at(state, step_id):
            client.resume_flow_run(UUID(flow_run_id), run_input={"signature_id": signature_id})
            return True
    return False


SUSPEND_REPAIR_AFTER = 120.0
"""Seconds a run must have been Paused without the schema of its input before the sweep saves it
(``_repair_cut_off_suspend``): Prefect's suspend saves the schema milliseconds after it sets the run
Paused, so a younger run may still be suspending, and saving the schema then makes the flow's own
save fail (409) and the run with it (d169697 took back a repair that did not wait)."""


def resume_signed_runs(
    settings: Settings, client: Any, grace: float = 5.0, repair_after: float = SUSPEND_REPAIR_AFTER
) -> int:
    """Resume every run suspended at a step that was signed more than ``grace`` seconds ago
    (the signer's own resume normally arrives first; this repairs a lost one). Returns how many
    Prefect accepted. A run whose suspend was cut off (Paused with no input schema for
    ``repair_after`` seconds) is repaired first."""
    apply_prefect_env(settings)  # before the first Prefect import in this process

    with read_session(settings.database_url) as s:
        pending = signed_but_suspended(s, older_than=grace)
    n = 0
    import httpx
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import PrefectException

    for flow_run_id, step_id, signature_id in pending:
        try:
            fr = client.read_flow_run(UUID(flow_run_id))
            if not _paused_at(fr.state, step_id):
                continue
            response = client.resume_flow_run(fr.id, run_input={"signature_id": signature_id})
            if response.status == SetStateStatus.ACCEPT or _repair_cut_off_suspend(
                client, fr, signature_id, repair_after
            ):
                n += 1
        except (PrefectException, httpx.HTTPError) as exc:  # the run is gone, the server refused a
            # write (its errors are httpx's): say so, and go on with the others, or one run that keeps
            # failing would hold back every run after it in this list on every sweep
            log.error("cannot resume flow run %s (%s): %s", flow_run_id, step_id, exc)
    return n


def _repair_cut_off_suspend(client: Any, flow_run: Any, signature_id: str, repair_after: float) -> bool:
    """Resume a run whose suspend was cut off; True when Prefect accepted the resume.

    ``suspend_flow_run`` sets the run Paused, then saves the schema of the input it waits for; a
    ``kill -9`` of the executor (or the server) between the two leaves a run Paused with no schema,
    and Prefect refuses every resume of it ("Run input schema not found"): the run would wait
    forever with its signature in the record. Only the sweep repairs it, and only once the run has
    been Paused for ``repair_after`` seconds: then no suspend is still under way. The schema is
    saved as the flow would have saved it, and the resume made again."""
    from prefect.client.schemas.responses import SetStateStatus

    state = flow_run.state
    keyset = state.state_details.run_input_keyset
    paused_for = (datetime.now(UTC) - state.timestamp).total_seconds()
    if not keyset or paused_for < repair_after or _has_input(client, flow_run.id, keyset["schema"]):
        return False
    from flows.engine.inputs import SignedInput  # imports Prefect: only on this rare path

    log.warning(
        "flow run %s has been paused %.0f s with no input schema (its suspend was cut off): saving %s and resuming it",
        flow_run.id,
        paused_for,
        keyset["schema"],
    )
    SignedInput.save(keyset, flow_run_id=flow_run.id)
    response = client.resume_flow_run(flow_run.id, run_input={"signature_id": signature_id})
    return bool(response.status == SetStateStatus.ACCEPT)


def _has_input(client: Any, flow_run_id: UUID, key: str) -> bool:
    import httpx

    try:
        client.read_flow_run_input(flow_run_id, key)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return False
        raise
    return True
