"""Stage 2: sopflow as operators see it in Prefect: run names, tags, parameters, artifacts, events.

- A flow run is named ``<sop>-<COI>`` (the dose's chain-of-identity id, when the SOP has one) or
  ``<sop>-<first 8 of the run id>``, and tagged ``institution:<id>``, ``sop:<id>`` and
  ``sop-version:<n>``.
- Its parameters are sopflow's run id and, to read, the institution, SOP id, version and COI. The
  flow reads everything it acts on from sopflow's record; nothing a person typed (beyond the COI,
  already the run's name) goes to Prefect, and nothing at all through ``run_input``, which the
  server hydrates as a template (DESIGN.md).
- Each rendered document is a link artifact of its flow run (``documents``): to the web app's page
  when ``SOPFLOW_WEB_URL`` is set, else to the file.
- sopflow's events go to Prefect's event stream, so automations can act on them:
  ``sopflow.step.waiting``, ``sopflow.step.signed``, ``sopflow.step.refused``,
  ``sopflow.deviation.opened``, ``sopflow.step.escalated``. The resource is the run
  (``sopflow.run.<id>``), related to its flow run and tagged like it; payloads carry ids, roles and
  classifications, never entered values.

Public Prefect APIs only: ``prefect.events.emit_event`` and ``prefect.artifacts.create_link_artifact``.
Both are best effort: an operator's view must never fail a step.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from flows.record.tables import SopRun
from flows.sop.model import SopDefinition

__all__ = ["EVENTS", "emit", "flow_run_name", "flow_run_parameters", "flow_run_tags", "publish_document"]

log = logging.getLogger("sopflow.operators")

EVENTS = (
    "sopflow.step.waiting",
    "sopflow.step.signed",
    "sopflow.step.refused",
    "sopflow.deviation.opened",
    "sopflow.step.escalated",
)


def _coi(sop: SopDefinition, params: dict[str, Any]) -> str | None:
    for name, spec in sop.params.items():
        if getattr(spec, "format", None) == "coi" and params.get(name):
            return str(params[name])
    value = params.get("coi") if "coi" in sop.params else None
    return str(value) if value else None


def flow_run_name(sop: SopDefinition, run_id: str, params: dict[str, Any]) -> str:
    coi = _coi(sop, params)
    return f"{sop.id}-{coi}" if coi else f"{sop.id}-{run_id[:8]}"


def flow_run_tags(institution: str, sop: SopDefinition) -> list[str]:
    return [f"institution:{institution}", f"sop:{sop.id}", f"sop-version:{sop.version}"]


def flow_run_parameters(institution: str, sop: SopDefinition, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "institution": institution,
        "sop_id": sop.id,
        "sop_version": sop.version,
        "coi": _coi(sop, params),
    }


def _related(run: SopRun) -> list[dict[str, str]]:
    return [
        {"prefect.resource.id": f"prefect.flow-run.{run.flow_run_id}", "prefect.resource.role": "flow-run"},
        {"prefect.resource.id": f"prefect.tag.institution:{run.institution}", "prefect.resource.role": "tag"},
        {"prefect.resource.id": f"prefect.tag.sop:{run.sop_id}", "prefect.resource.role": "tag"},
    ]


def emit(event: str, run: SopRun, payload: dict[str, Any]) -> None:
    """Emit one of sopflow's ``EVENTS`` about a run (best effort)."""
    try:
        from prefect.events import emit_event

        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"sopflow.run.{run.id}",
                "prefect.resource.name": f"{run.sop_id} run {run.id[:8]}",
                "sopflow.institution": run.institution,
                "sopflow.sop": run.sop_id,
                "sopflow.sop-version": str(run.sop_version),
            },
            related=_related(run),
            payload=json.loads(json.dumps(payload, default=str)),
        )
    except Exception:
        log.warning("could not emit %s for run %s", event, run.id, exc_info=True)


def publish_document(run: SopRun, step_id: str, document_id: str, path: str, sha256: str) -> None:
    """A link artifact on the run's flow run for a rendered document (best effort)."""
    try:
        from prefect.artifacts import create_link_artifact

        base = os.environ.get("SOPFLOW_WEB_URL", "").rstrip("/")
        link = f"{base}/documents/{document_id}" if base else f"file://{path}"
        create_link_artifact(
            link=link,
            link_text=os.path.basename(path),
            key=f"{run.sop_id}-{step_id}-{os.path.splitext(path)[1].lstrip('.')}".replace("_", "-").lower()[:100],
            description=f"{run.sop_id} v{run.sop_version} step {step_id}: controlled document, sha256 {sha256}",
            _sync=True,  # type: ignore[call-arg]  # from a sync task in the async flow: else a coroutine nobody awaits
        )
    except Exception:
        log.warning("could not publish document %s of run %s as an artifact", document_id, run.id, exc_info=True)
