"""Edge: the quality record as a person reads it in a terminal (``sopflow record``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

__all__ = ["print_record"]


def _value(v: Any, unit: str | None) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v} {unit}" if unit and v is not None else str(v)


def _print_signature(out: Console, label: str, sig: dict[str, Any]) -> None:
    valid = "" if sig["valid"] else " [red]SIGNATURE DOES NOT MATCH THE DATA[/red]"
    out.print(
        f"      {label}: {escape(sig['printed_name'])} ({sig['user']}), {sig['signed_at']}, meaning: {sig['meaning']}"
        + (f" — {escape(sig['statement'])}" if sig["statement"] else "")
        + f"; sha256 {sig['sha256'][:16]}…{valid}"
    )


def _duration(seconds: float) -> str:
    minutes = round(abs(seconds) / 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"


def deadline_text(d: dict[str, Any]) -> str:
    """A deadline as people read it: '12m left (due …)', 'overdue by 5m (due …)', 'met: 25m of 30m'."""
    due = f" (due {d['due_at'][:16].replace('T', ' ')} UTC)" if d.get("due_at") else ""
    limit = _duration(d["limit_seconds"]) if d.get("limit_seconds") is not None else "?"
    if d["state"] == "running":
        return f"{_duration(d['seconds_left'])} left{due}"
    if d["state"] == "overdue":
        return f"overdue by {_duration(d['seconds_left'])}{due}"
    if d["state"] in ("met", "breached"):
        return f"{d['state']}: {_duration(d['elapsed_seconds'])} of {limit}"
    return str(d["state"]) + (f": {d['problem']}" if d.get("problem") else "")


def print_record(out: Console, rec: dict[str, Any]) -> None:
    run = rec["run"]
    out.print(f"[bold]Quality record: run {run['id']}[/bold]")
    out.print(
        f'  SOP {run["institution"]}/{run["sop_id"]} v{run["sop_version"]} "{escape(run["sop_title"])}" sha256 {run["sop_sha256"]}'
    )
    out.print(f"  status {run['status']}" + (f" ({escape(run['status_detail'])})" if run["status_detail"] else ""))
    out.print(f"  started {run['started_at']} by {escape(run['started_by'])}; Prefect flow run {run['flow_run_id']}")
    if run.get("parent_run_id"):
        out.print(f"  sub-run of run {run['parent_run_id']} (its step {run['parent_step_id']})")
    params = ", ".join(f"{k}={v}" for k, v in run["params"].items())
    out.print(f"  parameters: {escape(params)}")
    if run["product"]:
        p = run["product"]
        out.print(f"  product: {escape(p['name'])} ({escape(p['mah'])}), storage max {p['storage_max_c']} °C")
    out.print("[bold]Steps[/bold]")
    for st in rec["steps"]:
        colour = {"done": "green", "failed": "red", "waiting": "yellow"}.get(st["status"], "white")
        out.print(f"  [{colour}]{st['status']:11}[/{colour}] {st['id']} ({st['kind']}): {escape(st['title'])}")
        for k, v in st["data"].items():
            if v is None:
                continue
            if k in ("deliveries",):
                v = (
                    ", ".join(f"{d['role']}→{d['channel']} {'ok' if d['ok'] else 'FAILED'}" for d in v)
                    or "no channel configured"
                )
            unit = st["fields"].get(k, {}).get("unit")
            label = st["fields"].get(k, {}).get("label", k)
            out.print(f"      {escape(str(label))}: {escape(_value(v, unit))}")
        sig = st["signature"]
        if sig:
            _print_signature(out, "signed", sig)
        for c in st.get("corrections", []):
            out.print(
                f"      [yellow]corrected[/yellow] {c['at']} by {escape(str(c['by']))}: {escape(c['reason'] or '')}"
            )
            for name, change in c["changes"].items():
                unit = st["fields"].get(name, {}).get("unit")
                label = st["fields"].get(name, {}).get("label", name)
                out.print(
                    f"        {escape(str(label))}: {escape(_value(change['old'], unit))} → {escape(_value(change['new'], unit))}"
                )
            if c["not_rerun"]:
                ran = ", ".join(f"{n['step_id']} ({n['kind']})" for n in c["not_rerun"])
                out.print(
                    f"        [yellow]corrected after {escape(ran)} had run on the earlier value; not re-run[/yellow]"
                )
            if c["signature"]:
                _print_signature(out, "  signed", c["signature"])
        if st.get("due_at"):
            out.print(f"      [yellow]due by {st['due_at']} (time-out)[/yellow]")
    if rec.get("deadlines"):
        out.print("[bold]Deadlines[/bold]")
        for d in rec["deadlines"]:
            out.print(f"  {escape(d['title'])} ({d['from']} → {d['to']}): {escape(deadline_text(d))}")
    if rec["deviations"]:
        out.print("[bold]Deviations[/bold]")
        for d in rec["deviations"]:
            out.print(
                f"  [red]{d['classification']}[/red] at {d['step_id']} ({d['opened_at']}): {escape(d['description'])}; "
                f"quarantine: {'yes' if d['quarantine'] else 'no'}; disposition: {d['decision'] or d['disposition']}"
                + (f"; {d['status']}" if d.get("status") else "")
                + ("; QUARANTINED" if d.get("quarantined") else "")
            )
            for e in d.get("lifecycle", []):
                out.print(f"      {e['at']} {e['kind']} (run {e['run_id'][:8]} step {e['step_id']})")
    if rec.get("subruns"):
        out.print("[bold]Sub-runs[/bold]")
        for r in rec["subruns"]:
            out.print(f"  {r['id']}  {r['sop_id']} v{r['sop_version']} from step {r['parent_step_id']}: {r['status']}")
    if rec["documents"]:
        out.print("[bold]Documents[/bold]")
        for doc in rec["documents"]:
            out.print(f"  {doc['template']}  sha256 {doc['sha256']}\n    {doc['path']}")
    if rec.get("escalations"):
        out.print("[bold]Escalations[/bold]")
        for e in rec["escalations"]:
            sent = ", ".join(f"{d['role']}→{d['channel']} {'ok' if d['ok'] else 'FAILED'}" for d in e["deliveries"])
            out.print(
                f"  {e['at']} {e['step_id']}: overdue (waiting since {e['waiting_since']}); {e['kind']} to "
                f"{e['to_role'] or 'no role'}: {escape(sent or 'no channel configured')}"
                + (f"; deviation {e['deviation_id']}" if e["deviation_id"] else "")
            )
    refused = [h for h in rec.get("history", []) if h["status"] == "refused"]
    if refused:
        out.print("[bold]Refused attempts[/bold]")
        for h in refused:
            out.print(f"  {h['at']} {h['step_id']}: {escape(h['reason'] or '')}")
    if rec.get("audit_head"):
        out.print(f"audit chain head: event {rec['audit_head']['seq']} {rec['audit_head']['hash']}")
    if cp := rec.get("checkpoint"):
        out.print(
            f"signed checkpoint {cp['n']}: event {cp['seq']}, key {cp['key_id']} "
            "(`sopflow record RUN --json` carries it for `sopflow audit verify --against`)"
        )
