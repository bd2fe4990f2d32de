"""Part 3 of bench/engine.py: the demo dose receipt end to end, human time excluded, through sopflow
and through its peers (bench/peers.py), interleaved in one run so drift and load hit all alike.

sopflow: ``start_run``, then each human step signed (``submit_step``: argon2, validation, the
signature) as soon as its record says it waits, until the run's record says ``completed``: seven
steps, a PDF and an apprise message included, every one recorded and audit-chained, through the
Prefect server and the workers. The peers do the same work per step (see bench/peers.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSTITUTION = "demo_hospital"
PASSWORD = "bench-password-1"  # noqa: S105 (throw-away users in a temporary home)
STAFF = {"rx_tech": "cell_lab", "rx_pharm": "pharmacist"}
PARAMS = {"product": "tecartus", "lot": "LOT-A7731", "patient_id": "H2026001"}


def setup(settings: Any, sops: Path, repo: Path, qa: Any, receiver_url: str) -> None:
    """demo_hospital's staff trained (bench/engine.py linked its folder), its SOPs established, the ward's channel."""
    from flows.services.accounts import add_user
    from flows.services.training import grant_training
    from flows.services.versions import establish

    for user, role in STAFF.items():
        add_user(settings, user, f"Bench {role}", PASSWORD, [(INSTITUTION, role)], officer=qa)
    for user in (*STAFF, qa.username):
        grant_training(settings, user, INSTITUTION, "dose_receipt", 1, trainer="Bench trainer", officer=qa)
    establish(settings, INSTITUTION, qa)
    settings.notify_config.write_text(f'{INSTITUTION}:\n  physician: ["{receiver_url}ward"]\n', encoding="utf-8")


def _sopflow_receipt(settings: Any, qa_user: str, coi: str, status: Callable[..., Any]) -> tuple[float, str]:
    from flows.services.runs import start_run
    from flows.services.signing import submit_step

    values = {
        "arrival": (
            "rx_tech",
            {
                "arrived_at": "2026-11-25T09:40:00+08:00",
                "courier": "SF 1234",
                "shipper_id": "DS-0042",
                "seal_intact": "yes",
                "logger_max_c": "-171.5",
                "transit_hours": "18.5",
            },
        ),
        "identity_verification": ("rx_pharm", {"coi_matches": "yes", "documents": "complete"}),
        "qa_acceptance": (qa_user, {"decision": "approve"}),
    }
    t0 = time.perf_counter()
    run_id = start_run(settings, INSTITUTION, "dose_receipt", {**PARAMS, "coi": coi}, qa_user, PASSWORD).run_id
    for step, (user, data) in values.items():
        _until(lambda step=step: status(settings, run_id, step) == "waiting", f"{step} of {run_id} never waited")
        submit_step(settings, run_id, step, user, PASSWORD, data)
    _until(lambda: status(settings, run_id, None) == "completed", f"receipt {run_id} never completed")
    return time.perf_counter() - t0, run_id


def _until(pred: Callable[[], bool], what: str, limit: float = 300.0) -> None:
    deadline = time.perf_counter() + limit
    while not pred():
        if time.perf_counter() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def peer_work(settings: Any, run_id: str, qa_user: str, receiver_url: str) -> Any:
    """The peers' step work, rendering the receipt from the content sopflow's run ``run_id`` rendered."""
    from sqlmodel import col, select

    from bench.peers import Work
    from flows.engine.steps import document_context, load_context
    from flows.outputs.documents import render_document, render_pdf
    from flows.record.db import read_session
    from flows.record.query import run_record
    from flows.record.tables import AuditEvent, User
    from flows.sop.check import template_name

    ctx = load_context(settings, run_id)
    step = ctx.sop.step("receipt_record")
    with read_session(settings.database_url) as s:
        record = run_record(s, run_id, with_history=False)
        head = s.exec(select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
        user = s.exec(select(User).where(User.username == qa_user)).one()
        password_hash = user.password_hash
    context = document_context(ctx, step, record, {"seq": head.seq, "hash": head.hash} if head else None)
    name = template_name(step.template, settings.templates_dir, INSTITUTION, context["document"]["language"])

    def render() -> tuple[str, bytes]:
        html, _ = render_document(settings.templates_dir, INSTITUTION, ctx.timezone, name or step.template, context)
        return html, render_pdf(html, settings.templates_dir)

    product = record["run"].get("product") or {}
    return Work(password_hash, PASSWORD, product, render, f"{receiver_url}ward")


def part3(
    settings: Any, qa_user: str, receiver_url: str, repeats: int, folder: Path, status: Callable[..., Any]
) -> dict[str, Any]:
    """Warm-up, then ``repeats`` rounds of sopflow, DBOS, SpiffWorkflow, interleaved."""
    import os

    from bench.peers import DbosReceipt, spiff_receipt

    _, warm_id = _sopflow_receipt(settings, qa_user, "COI-BENCH-W000", status)
    work = peer_work(settings, warm_id, qa_user, receiver_url)
    dbos = DbosReceipt(work, folder)
    out: dict[str, list[float]] = {"sopflow": [], "dbos": [], "spiff": [], "load": []}
    try:
        dbos.run("warm-up")
        spiff_receipt(work, folder / "spiff.db", "warm-up")
        for i in range(repeats):
            out["load"].append(os.getloadavg()[0])
            out["sopflow"].append(_sopflow_receipt(settings, qa_user, f"COI-BENCH-{i:04d}", status)[0])
            out["dbos"].append(dbos.run(f"r{i}"))
            out["spiff"].append(spiff_receipt(work, folder / "spiff.db", f"r{i}"))
    finally:
        dbos.close()
    return out


def report(r3: dict[str, Any]) -> list[str]:
    med = {k: statistics.median(v) for k, v in r3.items() if k != "load" and v}
    lines = [
        f"3. the dose receipt end to end, human time excluded, {len(r3['sopflow'])} rounds interleaved "
        f"(load average 1 min {min(r3['load']):.2f}-{max(r3['load']):.2f})",
    ]
    for k, label in (
        ("sopflow", "sopflow (Prefect + workers)"),
        ("dbos", "DBOS Transact on SQLite"),
        ("spiff", "SpiffWorkflow, saved every step"),
    ):
        runs = " ".join(f"{x:.2f}" for x in r3[k])
        lines.append(f"   {label:31s}: median {med[k]:7.2f} s   runs {runs}")
    lines.append(
        f"   ratios (median)                : sopflow/DBOS {med['sopflow'] / med['dbos']:.2f}x   "
        f"sopflow/SpiffWorkflow {med['sopflow'] / med['spiff']:.2f}x"
    )
    return lines
