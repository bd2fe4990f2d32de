"""Benchmark of sopflow's engine against plain Prefect, in one process, on one local Prefect server.

    python bench/engine.py [--steps N] [--resumes K] [--repeats R] [--receipts D]
                           [--postgres postgresql+psycopg2://postgres@127.0.0.1:5432] [--workers W]

1. Per-step overhead: an SOP of N automated ``check`` steps run through sopflow (``start_run``,
   then the run's status polled every 10 ms until ``completed``), against a plain Prefect flow of
   N trivial tasks called in this process. Each has a baseline subtracted (sopflow: an SOP of one
   check step; Prefect: a flow with no task), so per-step cost = (T_N - T_base) / (steps N has
   more than the baseline). Medians of R repeats, after one warm-up run of each; after each run
   the bench waits, untimed, until the server has recorded its task runs (they arrive late).
2. Signed submit -> next step: an SOP of K+1 ``record`` steps, signed one by one by one user;
   from the call to ``submit_step`` to the next step's newest record reading ``waiting`` (the DB
   polled every 5 ms). argon2 authentication is timed on its own and also subtracted. Median, p95
   and flatness (median of the last five resumes over the first five: a resume must cost the same
   late in a run as early), each printed with the load average it was measured under.
3. The demo dose receipt end to end, human time excluded, through sopflow, DBOS Transact (SQLite)
   and SpiffWorkflow (saved after every step), interleaved (bench/receipt.py, bench/peers.py;
   the peers install with ``pip install -e '.[bench]'``; without them part 3 is skipped).

With ``--postgres`` sopflow's records and the Prefect server use two fresh databases on that
server (dropped at the end) and ``--workers`` (default 2 then) sopflow workers run, each as its own
process with its own home, like workers on separate machines.

It prints figures and machine facts; it asserts nothing about speed. Everything lives under a
temporary SOPFLOW_HOME and SOPS dir on a free port and is removed at the end, the server and the
executor stopped even on error.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/engine.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402  (after the path is set)
    BASE_SOP,
    CHECKS_SOP,
    INSTITUTION,
    PASSWORD,
    ROLE,
    RUN_POLL,
    SIGNED_SOP,
    STEP_POLL,
    USER,
    median,
    ms,
    p95,
    run_status,
    step_status,
)
from bench.overhead import part1  # noqa: E402
from bench.resumes import part2, time_authenticate  # noqa: E402

PG_DBS = (f"sopflow_bench_{os.getpid()}", f"prefect_bench_{os.getpid()}")
HEADER = "# Owner: sopflow bench · Approval: none (benchmark fixture) · Effective: n/a\n"


# -- setup ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_sops(folder: Path, n_checks: int, k_resumes: int) -> None:
    inst = folder / INSTITUTION
    inst.mkdir(parents=True)
    (inst / "institution.yaml").write_text(
        HEADER + "schema_version: 1\n"
        f"id: {INSTITUTION}\nname: Bench Hospital\ntimezone: UTC\n"
        f"roles:\n  {ROLE}: {{label: Operator}}\n  qa: {{label: QA officer}}\n"
        "  sop_admin: {label: SOP administrator}\n  sop_reviewer: {label: SOP reviewer}\n",
        encoding="utf-8",
    )
    (inst / "products.yaml").write_text(
        HEADER + "schema_version: 1\nproducts:\n"
        "  bench_product:\n    name: Bench product\n    mah: Bench\n    storage_max_c: -150\n"
        "    thaw_to_infusion_max_min: 180\n    documents: [CoA]\n",
        encoding="utf-8",
    )

    def checks(sop_id: str, n: int) -> str:
        steps = "".join(
            f'  - {{id: c{i:03d}, kind: check, expect: "params.n >= 0", on_fail: stop}}\n' for i in range(n)
        )
        return (
            HEADER + f"schema_version: 1\nid: {sop_id}\ntitle: {n} automated checks\nversion: 1\n"
            "params:\n  n: {type: number}\nsteps:\n" + steps
        )

    (inst / f"{CHECKS_SOP}.yaml").write_text(checks(CHECKS_SOP, n_checks), encoding="utf-8")
    (inst / f"{BASE_SOP}.yaml").write_text(checks(BASE_SOP, 1), encoding="utf-8")
    steps = "".join(
        f"  - id: r{i:03d}\n    kind: record\n    role: {ROLE}\n    meaning: Recorded a value\n"
        f"    fields:\n      v: {{type: number}}\n"
        for i in range(k_resumes + 1)
    )
    (inst / f"{SIGNED_SOP}.yaml").write_text(
        HEADER + f"schema_version: 1\nid: {SIGNED_SOP}\ntitle: {k_resumes + 1} signed records\nversion: 1\n"
        "steps:\n" + steps,
        encoding="utf-8",
    )


def configure(home: Path, sops: Path, postgres: str | None = None) -> Any:
    """Point sopflow and Prefect at the temporary home; must run before Prefect is imported."""
    if "prefect" in sys.modules:
        raise RuntimeError("Prefect was imported before the bench set its environment")
    for key in (
        "SOPFLOW_DATABASE_URL",
        "SOPFLOW_PREFECT_API_URL",
        "SOPFLOW_PREFECT_DATABASE_URL",
        "SOPFLOW_NOTIFY_CONFIG",
    ):
        os.environ.pop(key, None)
    if postgres:
        os.environ["SOPFLOW_DATABASE_URL"] = f"{postgres}/{PG_DBS[0]}"
        os.environ["SOPFLOW_PREFECT_DATABASE_URL"] = f"{postgres.replace('psycopg2', 'asyncpg')}/{PG_DBS[1]}"
    os.environ["SOPFLOW_NOTIFY_CONFIG"] = str(home / "notify.yaml")  # every worker's, whatever its home
    os.environ["SOPFLOW_HOME"] = str(home)
    os.environ["SOPFLOW_PREFECT_PORT"] = str(free_port())
    os.environ["SOPFLOW_SOPS_DIR"] = str(sops)
    os.environ.setdefault("SOPFLOW_TEMPLATES_DIR", str(REPO / "templates"))
    from flows.config import get_settings
    from flows.engine.env import apply_prefect_env

    return apply_prefect_env(get_settings())


def api_round_trip(times: int = 20) -> list[float]:
    """A Prefect API round trip (GET /health through Prefect's client): the unit every task and state costs."""
    from prefect.client.orchestration import get_client

    out = []
    with get_client(sync_client=True) as client:
        client.api_healthcheck()
        for _ in range(times):
            t0 = time.perf_counter()
            client.api_healthcheck()
            out.append(time.perf_counter() - t0)
    return out


# -- report ----------------------------------------------------------------------------------------
def machine_facts(settings: Any) -> list[str]:
    import prefect
    import sqlalchemy

    try:
        git = ["git", "rev-parse", "--short", "HEAD"]  # read-only
        commit = (
            subprocess.run(git, cwd=REPO, capture_output=True, text=True, timeout=5, check=False).stdout.strip()  # noqa: S603
            or "?"
        )
    except OSError:
        commit = "?"
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"machine    {platform.machine()} {platform.system()} {platform.release()}; CPUs {cpus} (usable {usable}); load {load}",
        f"python     {platform.python_version()} ({sys.executable})",
        f"prefect    {prefect.__version__}; sqlalchemy {sqlalchemy.__version__}; sopflow commit {commit}",
        f"databases  sopflow {settings.database_url.split(':', 1)[0]}; Prefect server {settings.prefect_database_url.split(':', 1)[0]} "
        f"(local, port {settings.prefect_port})",
        f"workers    poll {settings.poll_seconds * 1000:.0f} ms busy .. {settings.poll_max_seconds * 1000:.0f} ms idle, nudged over UDP; "
        f"bench polls run status every {RUN_POLL * 1000:.0f} ms, step records every {STEP_POLL * 1000:.0f} ms",
    ]


def report(
    settings: Any,
    args: argparse.Namespace,
    r1: dict[str, Any],
    r2: dict[str, Any],
    auth: list[float],
    rtt: list[float],
    setup: float,
    total: float,
    workers: int = 1,
) -> None:
    n, k = args.steps, args.resumes
    print()
    print("sopflow engine bench")
    for line in machine_facts(settings):
        print("  " + line)
    print(
        f"  setup      server + executor ready in {setup:.1f} s; Prefect API round trip (GET /health) median {ms(median(rtt)).strip()}, "
        f"max {ms(max(rtt)).strip()}"
    )
    print()
    print(f"1. per-step overhead, {n} automated steps, medians of {args.repeats} (after one warm-up each)")
    print(
        f"   sopflow  : {n} check steps {ms(median(r1['sf_n']))} total, 1-step baseline {ms(median(r1['sf_base']))}"
        f"  (start_run -> record says completed)"
    )
    print(
        f"   Prefect  : {n} tasks       {ms(median(r1['pf_n']))} total, 0-task baseline {ms(median(r1['pf_base']))}"
        f"  (async @flow, sync @task called directly: run-sop's pattern)"
    )
    print(
        f"   Prefect' : {n} tasks       {ms(median(r1['pc_n']))} total, 0-task baseline {ms(median(r1['pc_base']))}"
        f"  (the same inside one SyncClientContext)"
    )

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b > 0 else "n/a"

    print(f"   per step : sopflow {ms(r1['sf_step'])}   Prefect {ms(r1['pf_step'])}   Prefect' {ms(r1['pc_step'])}")
    print(
        f"   ratio    : sopflow/Prefect {ratio(r1['sf_step'], r1['pf_step'])}   sopflow/Prefect' {ratio(r1['sf_step'], r1['pc_step'])}"
    )
    print(
        f"   Prefect's task-run states reached the server {ms(median(r1['settle'])).strip()} (median) after a plain flow returned "
        "(the bench waits for them, untimed, before the next run)"
    )
    for key, label in (("sf", "sopflow"), ("pf", "Prefect"), ("pc", "Prefect'")):
        print(
            f"   runs (s) : {label:8s} N "
            + " ".join(f"{x:.3f}" for x in r1[f"{key}_n"])
            + "  base "
            + " ".join(f"{x:.3f}" for x in r1[f"{key}_base"])
        )
    print()
    lat, call = r2["latency"], r2["call"]
    a = median(auth)
    net = [x - a for x in lat]
    load = r2["load"]
    print(
        f"2. signed submit -> next step waiting, {k} resumes of one run (target: p95 <= 1 s, then <= 200 ms; flat <= 1.2x)"
    )
    print(f"   load average (1 min) while measured: {min(load):.2f}-{max(load):.2f}")
    print(f"   argon2 authenticate alone: median {ms(a)}, max {ms(max(auth))} ({len(auth)} calls)")
    print(
        f"   submit -> next waiting     : median {ms(median(lat))}  p95 {ms(p95(lat))}  max {ms(max(lat))}  (load {load[len(load) // 2]:.2f})"
    )
    print(f"   the same less authenticate : median {ms(median(net))}  p95 {ms(p95(net))}  max {ms(max(net))}")
    print(
        f"   submit_step call returns   : median {ms(median(call))}  p95 {ms(p95(call))}  max {ms(max(call))}"
        f"  (resumed by the call: {sum(r2['resumed'])}/{len(r2['resumed'])})"
    )
    if len(lat) >= 10:
        first, last = median(lat[:5]), median(lat[-5:])
        print(
            f"   flatness, last 5 / first 5 : {last / first:.2f}x  (median {ms(first).strip()} -> {ms(last).strip()}; "
            f"load {load[0]:.2f} -> {load[-1]:.2f})"
        )
    print("   where a resume goes (Prefect's state history + sopflow's records; before 'signed' it is submit_step):")
    for name, xs in r2["phases"].items():
        if xs:
            print(f"     {name:27s}: median {ms(median(xs))}  max {ms(max(xs))}")
    print(f"   start_run -> first step waiting {ms(r2['first_wait'])}; last submit -> run completed {ms(r2['last'])}")
    print()
    print(f"   {workers} worker(s); load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total bench time {total:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="automated steps in part 1 (default 50)")
    parser.add_argument("--resumes", type=int, default=20, help="signed resumes in part 2 (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each part-1 run (default 3)")
    parser.add_argument(
        "--receipts", type=int, default=3, help="dose receipts of part 3 per engine (default 3; 0 skips)"
    )
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server for sopflow's records and Prefect's")
    parser.add_argument("--workers", type=int, default=None, help="sopflow workers (default 1; 2 with --postgres)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary SOPFLOW_HOME (its logs) after the run")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.resumes < 1 or args.repeats < 1:
        parser.error("--steps must be >= 2, --resumes and --repeats >= 1")
    workers = args.workers or (2 if args.postgres else 1)

    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sopflow-bench-"))
    home, sops = tmp / "home", tmp / "sops"
    write_sops(sops, args.steps, args.resumes)
    (sops / "demo_hospital").symlink_to(REPO / "sops" / "demo_hospital")  # part 3's dose receipt
    from bench import hosts

    if args.postgres:
        hosts.create_databases(args.postgres, PG_DBS)
    settings = configure(home, sops, args.postgres)

    from flows.cli.receiver import LocalReceiver
    from flows.services import server
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.training import grant_training
    from flows.services.versions import establish

    extra: list[Any] = []
    try:
        t0 = time.perf_counter()
        server.start(settings)  # waits as long as a fresh server's migrations take (a few minutes at most)
        extra = hosts.start_workers(settings, tmp, workers - 1)
        setup = time.perf_counter() - t0
        qa = Officer("bench_qa", PASSWORD)
        grants = [(INSTITUTION, "qa"), ("demo_hospital", "qa"), ("demo_hospital", "quality_manager")]
        add_user(settings, "bench_qa", "Bench QA", PASSWORD, grants)  # the first account
        add_user(settings, USER, "Bench User", PASSWORD, [(INSTITUTION, ROLE)], officer=qa)
        for sop_id in (CHECKS_SOP, BASE_SOP, SIGNED_SOP):  # signers must be trained on the SOP revision
            grant_training(settings, USER, INSTITUTION, sop_id, 1, trainer="Bench trainer", officer=qa)
        # Runs start only on Effective versions: the bench's files become the first ones (initial issue by QA).
        establish(settings, INSTITUTION, qa)
        rtt = api_round_trip()
        print(
            f"server and {workers} worker(s) up in {setup:.1f} s (home {home}); part 1: {args.steps} steps x {args.repeats} ...",
            flush=True,
        )
        r1 = part1(settings, args.steps, args.repeats)
        print(f"part 2: {args.resumes} signed resumes ...", flush=True)
        auth = time_authenticate(settings)
        r2 = part2(settings, args.resumes)
        r3 = None
        if args.receipts:
            with LocalReceiver() as rx:
                r3 = part3_or_none(settings, tmp, sops, qa, rx.url(""), args.receipts)
        report(settings, args, r1, r2, auth, rtt, setup, time.perf_counter() - t_all, workers)
        if r3 is not None:
            from bench.receipt import report as report3

            print()
            for line in report3(r3):
                print(line)
    finally:
        hosts.stop_workers(extra)
        server.stop(settings)
        if args.postgres:
            from flows.record.db import get_engine

            get_engine(settings.database_url).dispose()
            hosts.drop_databases(args.postgres, PG_DBS)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def part3_or_none(settings: Any, tmp: Path, sops: Path, qa: Any, receiver_url: str, receipts: int) -> Any:
    try:
        import dbos  # noqa: F401
        import SpiffWorkflow  # noqa: F401
    except ImportError:
        print("part 3 skipped: the peers are not installed (pip install -e '.[bench]')", flush=True)
        return None
    from bench import receipt

    print(f"part 3: {receipts} dose receipts each through sopflow, DBOS, SpiffWorkflow, interleaved ...", flush=True)
    receipt.setup(settings, sops, REPO, qa, receiver_url)

    def status(settings: Any, run_id: str, step: str | None) -> str | None:
        return step_status(settings, run_id, step) if step else run_status(settings, run_id)

    folder = tmp / "peers"
    folder.mkdir()
    return receipt.part3(settings, qa.username, receiver_url, receipts, folder, status)


if __name__ == "__main__":
    sys.exit(main())
