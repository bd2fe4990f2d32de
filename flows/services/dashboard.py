"""The service floor: the quality manager's dashboard (issue 14), one read of the institutions where
the reader holds a role: open runs by stage of the dose's chain (collection, receipt, storage,
infusion, other) and by the step they wait on; doses in quarantine; overdue steps, CAPA actions and
training; deviations opened per month; and the days from a dose's receipt to its infusion.

Reads only; every figure comes from the same records the CLI reads (``runs.list_runs``,
``flows.record.deviations``, ``training.overdue_training``, ``flows.record.chain``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlmodel import col, select

from flows.config import Settings
from flows.engine.escalation import overdue_steps
from flows.record.chain import STAGES, stage_of
from flows.record.db import init_db, read_session
from flows.record.deviations import list_deviations, run_coi
from flows.record.state import FINAL_STATUSES, run_status
from flows.record.tables import Deviation, RunEvent, SopRun, utcnow
from flows.record.versions import stored_sop
from flows.services import guard
from flows.services.training import overdue_training
from flows.services.wording import dose_facts
from flows.sop.model import SopDefinition

__all__ = ["quality_dashboard"]

MONTHS = 12


def _month(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


def _months_back(now: datetime, n: int) -> list[str]:
    out, year, month = [], now.year, now.month
    for _ in range(n):
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return list(reversed(out))


def _step_title(sop: SopDefinition | None, step_id: str | None) -> str | None:
    """The title of the step a run waits on (its id when the SOP does not name it)."""
    if sop is None or not step_id:
        return step_id
    base = step_id.partition("#")[0]
    step = next((st for st in sop.steps if st.id == base), None)
    return (step.title or step_id) if step is not None else step_id


def quality_dashboard(settings: Settings, username: str, now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, for the institutions where ``username`` holds a role.

    Raises:
        NotFoundError: no such user.
    """
    now = now or utcnow()
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        user = guard.target_user(s, username)
        mine = guard.institutions_of(s, user.id)
        runs = [r for r in s.exec(select(SopRun).order_by(col(SopRun.started_at))) if r.institution in mine]
        sops: dict[str, SopDefinition | None] = {}
        for r in runs:
            if r.sop_version_id not in sops:
                try:
                    sops[r.sop_version_id] = stored_sop(s, r)
                except Exception:  # an unreadable stored SOP still counts, without a stage
                    sops[r.sop_version_id] = None
        status = {r.id: run_status(s, r.id) for r in runs}
        ended = {
            r.id: ev.at
            for r in runs
            if (ev := s.exec(select(RunEvent).where(RunEvent.run_id == r.id).order_by(col(RunEvent.n).desc())).first())
            and ev.status in FINAL_STATUSES
        }
        # -- open runs by stage -----------------------------------------------------------------
        by_stage: dict[str, list[dict[str, Any]]] = {stage: [] for stage in (*STAGES, "other")}
        for r in runs:
            st = status[r.id]
            if st is not None and st.status in FINAL_STATUSES:
                continue
            sop = sops[r.sop_version_id]
            stage, _ = stage_of(r.sop_id, getattr(sop, "chain_stage", None)) if r.parent_run_id is None else (None, 0)
            by_stage[stage or "other"].append(
                {
                    "run_id": r.id,
                    "sop_id": r.sop_id,
                    "sop_title": sop.title if sop else r.sop_id,
                    "status": st.status if st else "unknown",
                    "waiting_on": _step_title(sop, st.detail) if st and st.status == "waiting" else None,
                    "dose": dose_facts(r, sop),
                    "started_at": r.started_at,
                }
            )
        # -- quarantine, CAPA, deviations by month ------------------------------------------------
        listed = list_deviations(s, now, include_closed=True)
        devs = [d for d in listed["deviations"] if d["institution"] in mine]
        quarantined = [d for d in devs if d["quarantined"]]
        capas = [c for c in listed["overdue_capas"] if any(c["deviation_id"] == d["id"] for d in devs)]
        months = _months_back(now, MONTHS)
        per_month = dict.fromkeys(months, 0)
        for dev in s.exec(select(Deviation)):
            run = s.get(SopRun, dev.run_id)
            if run is not None and run.institution in mine and _month(dev.opened_at) in per_month:
                per_month[_month(dev.opened_at)] += 1
        # -- overdue steps -------------------------------------------------------------------------
        late = [
            {
                "run_id": o.run.id,
                "step_id": o.step.id,
                "title": o.step.title or o.step.id,
                "role": o.step.role,
                "due": o.due,
                "late_by": (now - o.due).total_seconds(),
                "dose": dose_facts(o.run, o.sop),
            }
            for o in overdue_steps(s, now)
            if o.run.institution in mine
        ]
        # -- receipt to infusion, per dose ----------------------------------------------------------
        receipts: dict[str, datetime] = {}
        infusions: dict[str, datetime] = {}
        for r in runs:
            st = status[r.id]
            if r.parent_run_id is not None or st is None or st.status != "completed" or r.id not in ended:
                continue
            sop = sops[r.sop_version_id]
            stage, _ = stage_of(r.sop_id, getattr(sop, "chain_stage", None))
            coi = run_coi(r, sop)
            if coi and stage == "receipt":
                receipts.setdefault(coi, ended[r.id])
            elif coi and stage == "infusion":
                infusions[coi] = ended[r.id]
        receipt_to_infusion = [
            {"coi": coi, "days": round((infusions[coi] - at) / timedelta(days=1), 1)}
            for coi, at in sorted(receipts.items(), key=lambda kv: kv[1])
            if coi in infusions and infusions[coi] >= at
        ]
    return {
        "now": now,
        "institutions": sorted(mine),
        "open_by_stage": by_stage,
        "open_count": sum(len(v) for v in by_stage.values()),
        "quarantined": quarantined,
        "overdue_steps": late,
        "overdue_capas": capas,
        "overdue_training": [t for t in overdue_training(settings, now=now) if t["institution"] in mine],
        "deviations_by_month": [{"month": m, "count": per_month[m]} for m in months],
        "receipt_to_infusion": receipt_to_infusion,
    }
