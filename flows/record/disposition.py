"""Stage 3: reading a deviation's disposition and a run's COI: the pure reads that decide whether a
dose is quarantined (see ``flows.record.deviations`` for the lifecycle). They live apart from it
because the current-state tables (``flows.record.current``), which the ledger writes with every
row, decide quarantine with them and must not import modules that write through the ledger;
``flows.record.deviations`` re-exports them. Must not import prefect.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from flows.record.pinned import stored_sop
from flows.record.tables import DeviationEvent, SopRun

if TYPE_CHECKING:  # only annotations here: importing flows.sop is left to what parses an SOP
    from flows.sop.model import SopDefinition

__all__ = [
    "USE_VALUES",
    "coi_in",
    "coi_param",
    "deviation_events",
    "disposition",
    "disposition_value",
    "run_coi",
    "sop_of_run",
]


def coi_param(sop: SopDefinition | None, params: dict[str, Any]) -> str | None:
    """The name of the run's chain-of-identity param: one with ``format: coi``, else one named ``coi``."""
    if sop is not None:
        for name, spec in sop.params.items():
            if getattr(spec, "format", None) == "coi":
                return name
    return "coi" if "coi" in params else None


def run_coi(run: SopRun, sop: SopDefinition | None = None) -> str | None:
    """The COI a run carries in its params, if any."""
    return coi_in(json.loads(run.params_json), sop)


def coi_in(params: dict[str, Any], sop: SopDefinition | None = None) -> str | None:
    """The COI in a run's parsed params, if any (``run_coi`` without the run row)."""
    name = coi_param(sop, params)
    value = params.get(name) if name else None
    return str(value).strip() if value not in (None, "") else None


def deviation_events(session: Session, deviation_id: str) -> list[DeviationEvent]:
    return list(
        session.exec(
            select(DeviationEvent).where(DeviationEvent.deviation_id == deviation_id).order_by(col(DeviationEvent.n))
        )
    )


USE_VALUES = frozenset({"approve", "use", "use_with_risk_acceptance", "not_product_related"})
"""Disposition values under which the dose may be used (the parent run goes on); any other rejects it."""


def disposition_value(data: dict[str, Any]) -> str | None:
    """What a disposition step decided: its ``decision`` (approve steps), else ``outcome`` or ``disposition``."""
    for key in ("decision", "outcome", "disposition"):
        if data.get(key) not in (None, ""):
            return str(data[key])
    return None


def disposition(session: Session, dev_id: str, events: list[DeviationEvent] | None = None) -> dict[str, Any] | None:
    """The deviation's disposition once it is decided, else None: ``{"decision": "approve" | "reject",
    "value", "reason", "signed": [step ids]}``.

    Decided when a disposition event rejects (any value outside ``USE_VALUES``), or when every step
    with ``updates_deviation: disposition`` of the handling SOP's run has signed one (QA and
    physician, say); the inline ``<check>__disposition`` step is one step alone. The dose may be
    used only when every one of them says so."""
    events = deviation_events(session, dev_id) if events is None else events
    disp = [(e, json.loads(e.data_json)) for e in events if e.kind == "disposition"]
    if not disp:
        return None
    values = [disposition_value(d) for _, d in disp]
    reason = next(
        (d.get("reason") or d.get("rationale") for _, d in reversed(disp) if d.get("reason") or d.get("rationale")),
        None,
    )
    signed = [e.step_id for e, _ in disp]
    rejecting = [v for v in values if v not in USE_VALUES]
    if rejecting:
        return {"decision": "reject", "value": rejecting[0], "reason": reason, "signed": signed}
    needed: set[str] = set()
    for e in events:
        if e.kind == "subrun":
            run = session.get(SopRun, json.loads(e.data_json).get("run_id"))
            sop = sop_of_run(session, run) if run is not None else None
            needed |= {
                st.id for st in (sop.steps if sop else ()) if getattr(st, "updates_deviation", None) == "disposition"
            }
    if needed - set(signed) and not any(s.endswith("__disposition") for s in signed):
        return None  # the other signer(s) of the disposition have not signed yet
    return {"decision": "approve", "value": values[-1], "reason": reason, "signed": signed}


def sop_of_run(session: Session, run: SopRun) -> SopDefinition | None:
    try:
        return stored_sop(session, run)
    except Exception:  # an unreadable stored SOP: fall back to a param named coi
        return None
