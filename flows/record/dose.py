"""Stage 3: what a run is about, for people: the dose (product, COI, lot, patient id) and the words
its institution uses (language, time zone, role labels), read from the run's row, its pinned SOP
and ``institution.yaml``. The web's pages and the engine's notifications both read it here.
Must not import prefect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flows.config import Settings
from flows.errors import FlowsError
from flows.record.deviations import coi_param
from flows.record.tables import SopRun
from flows.sop.load import load_institution_file
from flows.sop.model import SopDefinition, text_in

__all__ = ["LOT_NAMES", "PATIENT_NAMES", "RunFacts", "dose_facts", "run_facts"]

LOT_NAMES = ("lot", "lot_number", "batch", "batch_number")
PATIENT_NAMES = ("patient_id", "patient", "mrn", "hospital_number")


def dose_facts(run: SopRun, sop: SopDefinition | None) -> dict[str, Any]:
    """Product name (and its Chinese name), COI, lot and patient id of the dose a run is about; each
    None when the run's SOP has no such parameter."""
    params = json.loads(run.params_json)
    product = json.loads(run.product_json) if run.product_json else {}
    specs = sop.params if sop is not None else {}
    coi_name = coi_param(sop, params)
    lot = next((n for n in LOT_NAMES if n in params), None)
    patient = next((n for n in PATIENT_NAMES if n in params), None)
    if patient is None:
        patient = next((n for n, f in specs.items() if f.phi and n in params), None)
    return {
        "product": product.get("name"),
        "product_zh": product.get("name_zh"),
        "coi": params.get(coi_name) if coi_name else None,
        "lot": params.get(lot) if lot else None,
        "patient": params.get(patient) if patient else None,
    }


@dataclass(frozen=True)
class RunFacts:
    """A run as a message about it names it, in its institution's language."""

    run_id: str
    institution: str
    language: str
    timezone: str
    sop_title: str
    dose: dict[str, Any]
    roles: dict[str, str] = field(default_factory=dict)
    web_url: str | None = None

    def role(self, role_id: str) -> str:
        return self.roles.get(role_id, role_id)

    def link(self, path: str) -> str | None:
        """``path`` on the web app (``SOPFLOW_WEB_URL``), or None when no address is configured."""
        return f"{self.web_url.rstrip('/')}{path}" if self.web_url else None


def run_facts(settings: Settings, run: SopRun, sop: SopDefinition) -> RunFacts:
    """The facts of ``run`` for a message, in the language of its institution (``en`` if its file is broken)."""
    try:
        spec = load_institution_file(settings.sops_dir / run.institution / "institution.yaml")
        language, zone = spec.language, spec.timezone
        roles = {rid: text_in(r.label, language) for rid, r in spec.roles.items()}
    except (FlowsError, OSError):
        language, zone, roles = "en", "UTC", {}
    return RunFacts(
        run_id=run.id,
        institution=run.institution,
        language=language,
        timezone=zone,
        sop_title=text_in(sop.title, language),
        dose=dose_facts(run, sop),
        roles=roles,
        web_url=settings.web_url,
    )
