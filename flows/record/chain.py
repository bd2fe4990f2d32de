"""Stage 3: the chain of identity of one dose: every run that touched its COI, in order.

A run belongs to the chain when its params carry the COI (a param with ``format: coi``, else one
named ``coi``), or when it is a sub-run of such a run. Each root run is a link of a stage: the
SOP's ``chain_stage`` (collection, receipt, storage, infusion), else a guess from the SOP id
(``*collect*``/``apheresis``, ``*receipt*``, ``*storage*``/``cryo``, ``*infusion*``, said so).

The chain is unbroken when each of the four stages has a completed run, in that order, no run on
the dose ended otherwise (rejected, stopped, failed) or is still open, and no deviation on it is
open. Every reason it is not is listed in ``problems``. Must not import prefect.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from flows.record.deviations import deviation_state, run_coi
from flows.record.state import FINAL_STATUSES, run_status
from flows.record.tables import Deviation, RunEvent, SopRun, iso_utc
from flows.record.versions import stored_sop
from flows.sop.model import SopDefinition

__all__ = ["STAGES", "chain_of_identity", "stage_of"]

STAGES = ("collection", "receipt", "storage", "infusion")
_GUESS = (
    ("collection", ("collect", "apheresis")),
    ("receipt", ("receipt", "receiv")),
    ("storage", ("storage", "cryo", "store")),
    ("infusion", ("infusion", "infuse")),
)


def stage_of(sop_id: str, declared: str | None) -> tuple[str | None, bool]:
    """(stage, guessed): the SOP's ``chain_stage``, else a guess from its id."""
    if declared:
        return declared, False
    for stage, words in _GUESS:
        if any(w in sop_id for w in words):
            return stage, True
    return None, False


def chain_of_identity(session: Session, coi: str) -> dict[str, Any]:
    coi = coi.strip()
    runs = list(session.exec(select(SopRun).order_by(col(SopRun.started_at), col(SopRun.id))))
    sops: dict[str, SopDefinition | None] = {}
    for r in runs:
        try:
            sops[r.id] = stored_sop(session, r)
        except Exception:  # an unreadable stored SOP still shows, without a stage
            sops[r.id] = None
    members = {r.id for r in runs if run_coi(r, sops[r.id]) == coi}
    changed = True
    while changed:  # sub-runs of members, whatever their params
        changed = False
        for r in runs:
            if r.id not in members and r.parent_run_id in members:
                members.add(r.id)
                changed = True
    chosen = [r for r in runs if r.id in members]
    children: dict[str | None, list[SopRun]] = {}
    for r in chosen:
        children.setdefault(r.parent_run_id if r.parent_run_id in members else None, []).append(r)

    entries: list[dict[str, Any]] = []
    problems: list[str] = []

    def visit(run: SopRun, depth: int) -> None:
        sop = sops[run.id]
        status = run_status(session, run.id)
        last = session.exec(select(RunEvent).where(RunEvent.run_id == run.id).order_by(col(RunEvent.n).desc())).first()
        stage, guessed = (None, False) if depth else stage_of(run.sop_id, getattr(sop, "chain_stage", None))
        devs = [
            deviation_state(session, d)
            for d in session.exec(
                select(Deviation).where(Deviation.run_id == run.id).order_by(col(Deviation.opened_at))
            )
        ]
        entries.append(
            {
                "run_id": run.id,
                "sop_id": run.sop_id,
                "sop_title": sop.title if sop else run.sop_id,
                "sop_version": run.sop_version,
                "depth": depth,
                "parent_run_id": run.parent_run_id,
                "parent_step_id": run.parent_step_id,
                "stage": stage,
                "stage_guessed": guessed,
                "status": status.status if status else "unknown",
                "status_detail": status.detail if status else None,
                "started_at": iso_utc(run.started_at),
                "ended_at": iso_utc(last.at) if last and last.status in FINAL_STATUSES else None,
                "deviations": devs,
            }
        )
        for child in children.get(run.id, []):
            visit(child, depth + 1)

    for root in children.get(None, []):
        visit(root, 0)

    for e in entries:
        name = f"run {e['run_id'][:8]} ({e['sop_id']})"
        if e["status"] in ("rejected", "stopped", "failed"):
            problems.append(f"{name} ended {e['status']}: {e['status_detail'] or ''}".rstrip(": "))
        elif e["status"] != "completed":
            problems.append(f"{name} has not ended (it is {e['status']})")
        for d in e["deviations"]:
            if d["status"] != "closed":
                problems.append(
                    f"deviation {d['id']} on {name} is {d['status']}"
                    + (" and quarantines the dose" if d["quarantined"] else "")
                )
    done_at: dict[str, str] = {}
    for e in entries:
        if e["stage"] and e["status"] == "completed" and e["stage"] not in done_at:
            done_at[e["stage"]] = e["started_at"] or ""
    previous: str | None = None
    for stage in STAGES:
        if stage not in done_at:
            problems.append(f"no completed {stage} run for {coi}")
            continue
        if previous is not None and done_at[stage] < done_at[previous]:
            problems.append(f"the {stage} run started before the {previous} run")
        previous = stage
    return {
        "coi": coi,
        "runs": entries,
        "unbroken": bool(entries) and not problems,
        "problems": problems if entries else [f"no run carries COI {coi!r}"],
    }
