"""``sopflow demo``: two CAR-T dose receipts, end to end, through the same signed path people use.

1. an example institution (``sops/demo_hospital``), four staff with their roles, a local
   notification receiver that apprise delivers to for real;
2. the local Prefect server and the executor, started if they are not running;
3. receipt A: every step signed by the right person, with a wrong value and a wrong signer
   refused on the way; the dose is accepted and the receipt document rendered;
4. receipt B: the transit logger shows a temperature above the product's storage limit, the
   check opens a deviation, and QA rejects the dose in a signed disposition;
5. the quality records, the notifications delivered, and ``audit verify``.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from flows.cli.receiver import LocalReceiver
from flows.cli.render import print_record
from flows.config import Settings
from flows.errors import FlowsError, RecordError
from flows.services import server
from flows.services.accounts import add_user, list_users
from flows.services.audit import verify_audit
from flows.services.guard import Officer, sign_in
from flows.services.runs import start_run, wait_for_run
from flows.services.signing import submit_step
from flows.services.training import grant_training, list_training
from flows.services.versions import establish, list_versions

__all__ = ["DEMO_USERS", "run_demo"]

INSTITUTION = "demo_hospital"
SOP = "dose_receipt"
MARKER = "# written by `sopflow demo`; delete this file to configure your own channels\n"
DEMO_USERS = {
    # username: (printed name, role, password)
    "li.wei": ("Li Wei 李伟", "cell_lab", "demo-cell-lab-1"),
    "zhang.min": ("Zhang Min 张敏", "pharmacist", "demo-pharmacist-1"),
    "wang.fang": ("Wang Fang 王芳", "qa", "demo-qa-officer-1"),
    "chen.jie": ("Chen Jie 陈洁", "quality_manager", "demo-quality-mgr-1"),
    "zhao.lei": ("Zhao Lei 赵磊", "physician", "demo-physician-1"),
}


def _pw(user: str) -> str:
    return DEMO_USERS[user][2]


QA = "wang.fang"
"""The demo's QA officer: the installation's first account, who then adds the others and records training."""


def _ensure_users(settings: Settings) -> None:
    qa = Officer(QA, _pw(QA))
    existing = {u["username"] for u in list_users(settings)}
    for username in [QA, *(u for u in DEMO_USERS if u != QA)]:
        name, role, password = DEMO_USERS[username]
        if username in existing:
            try:
                sign_in(settings, username, password, "demo: the demo's own account")
            except FlowsError:
                raise RecordError(
                    f"demo user {username!r} exists with another password; use a fresh SOPFLOW_HOME"
                ) from None
        else:  # the first account is the QA officer's; she adds the others (guard.first_account)
            add_user(settings, username, name, password, [(INSTITUTION, role)], officer=None if username == QA else qa)
    # Runs start only on an Effective version: the first time, QA establishes the SOP files as the first ones.
    if not list_versions(settings, INSTITUTION):
        establish(settings, INSTITUTION, qa)
    # Signers must be trained on the SOP version a run uses, recorded by the QA officer.
    version = next(v["version"] for v in list_versions(settings, INSTITUTION, SOP) if v["state"] == "effective")
    trained = {(r["username"], r["sop_version"]) for r in list_training(settings) if r["sop_id"] == SOP}
    for username in DEMO_USERS:
        if (username, version) not in trained:
            grant_training(settings, username, INSTITUTION, SOP, version, trainer="Demo trainer", officer=qa)


def _write_channels(settings: Settings, rx: LocalReceiver, out: Console) -> bool:
    path = settings.notify_config
    if path.exists() and not path.read_text(encoding="utf-8").startswith(MARKER):
        out.print(f"  notifications go to the channels you configured in {path}")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    roles = {role for _, role, _ in DEMO_USERS.values()}
    lines = [MARKER, f"{INSTITUTION}:\n"] + [f'  {r}: ["{rx.url(r)}"]\n' for r in sorted(roles)]
    path.write_text("".join(lines), encoding="utf-8")
    return True


def _wait(
    settings: Settings, run_id: str, *, step: str | None = None, statuses: tuple[str, ...] = (), timeout: float = 90.0
) -> dict[str, Any]:
    return wait_for_run(settings, run_id, step=step, statuses=statuses, timeout=timeout)


def _sign(settings: Settings, out: Console, run_id: str, step: str, user: str, values: dict[str, Any]) -> None:
    _wait(settings, run_id, step=step)
    res = submit_step(settings, run_id, step, user, _pw(user), values)
    name = DEMO_USERS[user][0]
    out.print(
        f"  [green]✔[/green] {step}: signed by {name} ({DEMO_USERS[user][1]}), signature sha256 {res.signed_sha256[:12]}…"
    )


def _refused(
    settings: Settings, out: Console, what: str, run_id: str, step: str, user: str, values: dict[str, Any]
) -> bool:
    try:
        submit_step(settings, run_id, step, user, _pw(user), values)
    except FlowsError as exc:
        first = str(exc).splitlines()[0]
        out.print(f"  [yellow]✘[/yellow] {what}: refused — {escape(first)}")
        return True
    out.print(f"  [red]!! {what} was NOT refused[/red]")
    return False


ARRIVAL = {
    "arrived_at": "2026-11-25T09:40:00+08:00",
    "courier": "SF Express AWB 1234567890",
    "shipper_id": "DS-0042",
    "seal_intact": "yes",
    "transit_hours": "18.5",
}


def run_demo(settings: Settings, out: Console, *, keep: bool = False) -> int:
    ok = True
    out.print("[bold]sopflow demo: CAR-T dose receipt (WF2) at Demo Hospital[/bold]")
    was_running = all(st.alive for st in server.status(settings))
    with LocalReceiver() as rx:
        own_channels = _write_channels(settings, rx, out)
        out.print(f"  data directory {settings.home}; starting the local Prefect server and executor…")
        server.start(settings)
        try:
            _ensure_users(settings)
            ok &= _receipt_accepted(settings, out)
            ok &= _receipt_excursion(settings, out)
            report = verify_audit(settings)
            out.print(
                f"\n[bold]audit verify[/bold]: {'[green]OK[/green]' if report.ok else '[red]BROKEN[/red]'} "
                f"({report.events} events, {report.rows} record rows)"
            )
            ok &= report.ok
            if own_channels:
                rx.wait_for(lambda m: "accepted and in stock" in m.get("message", ""), timeout=10)
                out.print(
                    f"\n[bold]notifications delivered through apprise to the local receiver ({len(rx.messages)})[/bold]"
                )
                for m in rx.messages:
                    out.print(f"  → {m['path'].strip('/')}: {escape(m.get('title', ''))}")
        finally:
            if not keep and not was_running:
                server.stop(settings)
                out.print("\nstopped the local Prefect server and executor (`sopflow demo --keep` leaves them running)")
    out.print(
        "\n[bold green]demo finished: receipt A completed, receipt B rejected with a deviation, audit chain OK[/bold green]"
        if ok
        else "\n[bold red]demo finished with unexpected results (see above)[/bold red]"
    )
    return 0 if ok else 1


def _start(settings: Settings, out: Console, coi: str, lot: str) -> str:
    params = {"product": "tecartus", "coi": coi, "lot": lot, "patient_id": "H2026001"}
    res = start_run(settings, INSTITUTION, "dose_receipt", params, "chen.jie", _pw("chen.jie"))
    out.print(
        f"  started run {res.run_id} (dose_receipt v{res.sop_version}, sha256 {res.sop_sha256[:12]}…) "
        f"by Chen Jie, quality manager"
    )
    return res.run_id


def _receipt_accepted(settings: Settings, out: Console) -> bool:
    out.print("\n[bold]Receipt A: an intact shipment[/bold]")
    run_id = _start(settings, out, "COI-KT-2026-0117", "LOT-A7731")
    _wait(settings, run_id, step="arrival")
    ok = _refused(
        settings,
        out,
        "a logger reading of -250 °C (the field allows -200 to 40 °C)",
        run_id,
        "arrival",
        "li.wei",
        {**ARRIVAL, "logger_max_c": "-250"},
    )
    _sign(settings, out, run_id, "arrival", "li.wei", {**ARRIVAL, "logger_max_c": "-171.5"})
    _wait(settings, run_id, step="identity_verification")
    ok &= _refused(
        settings,
        out,
        "the cell-lab technician signing the pharmacist's identity check",
        run_id,
        "identity_verification",
        "li.wei",
        {"coi_matches": "yes", "documents": "complete"},
    )
    _sign(settings, out, run_id, "identity_verification", "zhang.min", {"coi_matches": "yes", "documents": "complete"})
    _sign(settings, out, run_id, "qa_acceptance", "wang.fang", {"decision": "approve"})
    rec = _wait(settings, run_id, statuses=("completed", "rejected", "stopped"))
    out.print()
    print_record(out, rec)
    return bool(ok and rec["run"]["status"] == "completed" and rec["documents"])


def _receipt_excursion(settings: Settings, out: Console) -> bool:
    out.print("\n[bold]Receipt B: the transit logger shows -120 °C, above Tecartus's -150 °C limit[/bold]")
    run_id = _start(settings, out, "COI-KT-2026-0118", "LOT-A7790")
    _sign(settings, out, run_id, "arrival", "li.wei", {**ARRIVAL, "logger_max_c": "-120"})
    rec = _wait(settings, run_id, step="transit_temperature__disposition")
    out.print(
        f"  [red]✘[/red] transit_temperature failed: deviation opened ({rec['deviations'][0]['classification']}), "
        "dose quarantined; QA must sign a disposition"
    )
    _sign(
        settings,
        out,
        run_id,
        "transit_temperature__disposition",
        "wang.fang",
        {"decision": "reject", "reason": "Transit excursion to -120 °C; dose quarantined, MAH notified for return"},
    )
    rec = _wait(settings, run_id, statuses=("completed", "rejected", "stopped"))
    out.print()
    print_record(out, rec)
    return bool(rec["run"]["status"] == "rejected" and rec["deviations"])
