"""``audit verify`` at scale (issue 11, part 3): throughput, peak memory and incremental time.

    python bench/audit.py [--sizes 100000,1000000] [--db sqlite|postgres|both]

Builds a chain of N events through the project's own write path (``ledger.append``: every row with
its audit event, hash-chained; bulk in a few large transactions, never raw SQL that skips the
chain): runs of the demo dose-receipt SOP, each with its run row, run events, step records and
a signature whose hash covers its data (about 8 events a run). It then signs a checkpoint and
measures, each in a fresh process so one does not warm the other's memory:

- a full ``verify_audit`` (chain, rows, signatures, checkpoints): events a second, peak memory
  (``resource.getrusage`` max RSS of that process, and tracemalloc's peak of Python objects);
- an incremental one after 1,000 more events and a new checkpoint (``--incremental``).

Wall-clock figures on a shared machine mostly measure the other processes: each line also gives
the verify process's own CPU time (``time.process_time``). Targets: ≥ 100,000 events/s, ≤ 200 MB at 1,000,000 events, incremental ≤ 1 s. Every figure is
printed with the load average. PostgreSQL: a throwaway database ``tamper_bench_<random>`` on
127.0.0.1:5432, dropped afterwards. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
EVENTS_PER_RUN = 8


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def _settings(home: Path, url: str) -> Any:
    from flows.config import get_settings

    return dataclasses.replace(get_settings(), home=home, database_url=url)


def build(url: str, events: int) -> None:
    """Append runs until the chain holds ``events`` events (through ``ledger.append``)."""
    import yaml

    from flows.record import ledger
    from flows.record.db import init_db, write_session
    from flows.record.tables import RunEvent, Signature, SopRun, SopVersion, StepRecord, User, utcnow

    init_db(url)
    sop_path = REPO / "sops" / "demo_hospital" / "dose_receipt.yaml"
    text = sop_path.read_text(encoding="utf-8")
    sop = yaml.safe_load(text)
    sha = ledger.sha256_hex(sop_path.read_bytes())
    with write_session(url) as s:
        user = User(
            username="bench.user",
            printed_name="Bench User",
            password_hash="x",  # noqa: S106  (a bench user nobody signs in as)
            created_at=utcnow(),
            created_by="system",
        )
        ledger.append(s, user, actor="system", action="user.create")
        version = SopVersion(
            institution="demo_hospital",
            sop_id=sop["id"],
            version=sop["version"],
            schema_version=sop["schema_version"],
            sha256=sha,
            text=text,
            stored_at=utcnow(),
        )
        ledger.append(s, version, actor="system", action="sop_version.store")
        user_id, version_id = user.id, version.id
    made, batch = 2, 250
    while made < events:
        with write_session(url) as s:
            for _ in range(batch):
                if made >= events:
                    break
                now = utcnow()
                run = SopRun(
                    institution="demo_hospital",
                    sop_version_id=version_id,
                    sop_id=sop["id"],
                    sop_version=sop["version"],
                    sop_sha256=sha,
                    schema_version=sop["schema_version"],
                    params_json=json.dumps({"coi": f"COI-{made:08d}", "lot": "LOT-1", "product": "axi_cel"}),
                    product_json=None,
                    flow_run_id=secrets.token_hex(16),
                    started_by=user_id,
                    started_at=now,
                )
                ledger.append(s, run, actor=user_id, action="run.start")
                for n, status in enumerate(("scheduled", "running", "completed"), 1):
                    ledger.append(s, RunEvent(run_id=run.id, n=n, status=status, at=now), actor="system")
                data = {"seal_intact": True, "logger_max_c": -180}
                sig = Signature(
                    run_id=run.id,
                    step_id="arrival",
                    user_id=user_id,
                    printed_name="Bench User",
                    meaning="performed",
                    statement="Received",
                    signed_at=now,
                    signed_sha256="",
                )
                sig.signed_sha256 = ledger.sha256_hex(
                    ledger.canonical(ledger.signed_content(run, "arrival", data, sig))
                )
                ledger.append(s, sig, actor=user_id, action="signature.create")
                for n, (step, status, d, sid) in enumerate(
                    (
                        ("arrival", "waiting", {"role": "cell_lab"}, None),
                        ("arrival", "done", data, sig.id),
                        ("transit_temperature", "done", {"passed": True, "expect": "x", "detail": None}, None),
                    ),
                    1,
                ):
                    rec = StepRecord(
                        run_id=run.id,
                        n=n,
                        step_id=step,
                        kind="record" if step == "arrival" else "check",
                        status=status,
                        data_json=ledger.canonical(d).decode(),
                        actor_id=user_id if sid else None,
                        signature_id=sid,
                        at=now,
                    )
                    ledger.append(s, rec, actor="system")
                made += EVENTS_PER_RUN


def measure(url: str, home: str, incremental: bool, traced: bool) -> None:
    """In a fresh process: one verify; prints a JSON line. ``traced`` adds tracemalloc's peak (it slows
    Python down several times, so the CPU figure comes from an untraced run)."""
    import tracemalloc

    from flows.services.audit import verify_audit

    settings = _settings(Path(home), url)
    if traced:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    report = verify_audit(settings, incremental=incremental)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1] if traced else 0
    if traced:
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    figures: dict[str, Any] = {
        "ok": report.ok,
        "problems": report.problems[:3],
        "events": report.events,
        "head": report.head[0] if report.head else 0,
        "seconds": took,
        "rss_mb": rss,
        "py_peak_mb": peak / 1e6,
    }
    if not traced:
        figures["cpu"] = cpu
    print(json.dumps(figures))


def _child(url: str, home: Path, incremental: bool, traced: bool) -> dict[str, Any]:
    args = [sys.executable, __file__, "--measure", url, str(home)] + (["--incremental"] if incremental else [])
    env = {**os.environ, "BENCH_TRACE": "1" if traced else ""}
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)  # noqa: S603  (this script itself)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def bench(kind: str, sizes: list[int]) -> None:
    from sqlalchemy import create_engine, text

    from flows.record.db import get_engine
    from flows.services.audit import make_checkpoint

    for n in sizes:
        home = Path(tempfile.mkdtemp(prefix="tamper-bench-"))
        if kind == "sqlite":
            url, name = f"sqlite:///{home / 'sopflow.db'}", None
        else:
            name = f"tamper_bench_{secrets.token_hex(3)}"
            admin = create_engine(f"{PG}/test", isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{name}"'))
            url = f"{PG}/{name}"
        try:
            t0 = time.perf_counter()
            build(url, n)
            built = time.perf_counter() - t0
            settings = _settings(home, url)
            make_checkpoint(settings)
            print(
                f"{kind} N={n:>9,}: built through ledger.append in {built:6.1f} s ({n / built:,.0f} events/s)  [{load()}]"
            )
            full = _child(url, home, incremental=False, traced=False)
            print(
                f"{kind} N={n:>9,}: full verify   {full['seconds']:6.2f} s  {full['events'] / full['seconds']:>10,.0f} events/s"
                f" (its own CPU {full['cpu']:.2f} s: {full['events'] / full['cpu']:,.0f} events/s)"
                f"  max RSS {full['rss_mb']:6.0f} MB  ok={full['ok']} {full['problems'] or ''}  [{load()}]"
            )
            traced = _child(url, home, incremental=False, traced=True)
            print(
                f"{kind} N={n:>9,}: full verify under tracemalloc: Python objects' peak {traced['py_peak_mb']:6.1f} MB"
                f"  ({traced['seconds']:.1f} s: tracing slows it)  [{load()}]"
            )
            build_more(url, 1000)
            make_checkpoint(settings)
            inc = _child(url, home, incremental=True, traced=False)
            print(
                f"{kind} N={n:>9,}: incremental   {inc['seconds']:6.3f} s (CPU {inc['cpu']:.3f} s)  ({inc['events']} events after the verified "
                f"checkpoint)  max RSS {inc['rss_mb']:6.0f} MB  ok={inc['ok']} {inc['problems'] or ''}  [{load()}]"
            )
        finally:
            get_engine(url).dispose()
            if name is not None:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()


def build_more(url: str, events: int) -> None:
    """``events`` more events (audit events with a small payload, as sign-ins write them)."""
    from flows.record import ledger
    from flows.record.db import write_session

    with write_session(url) as s:
        for i in range(events):
            ledger.audit(s, actor="system", action="auth.ok", object_type="bench", object_id=str(i), payload={"i": i})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        url, home = sys.argv[2], sys.argv[3]
        measure(url, home, "--incremental" in sys.argv, traced=bool(os.environ.get("BENCH_TRACE")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"bench/audit.py: sizes {sizes}, {os.cpu_count()} cores  [{load()}]")
    for kind in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        bench(kind, sizes)


if __name__ == "__main__":
    main()
