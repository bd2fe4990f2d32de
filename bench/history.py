"""Benchmark of reads against a growing history: does what costs a person or the worker grow with
the runs ever recorded, or only with what is open? (issue 11)

    python bench/history.py [--sizes 1000,10000,100000] [--db sqlite,postgresql] [--cache DIR]
                            [--users 20] [--web-workers N] [--open 200] [--timeout 120] [--quick]
                            [--postgres postgresql+psycopg2://postgres@127.0.0.1:5432]
                            [--incremental-flag FLAG] [--only audit,inbox,runs,cli,sweep,web,idle]

History: the real demo (``sopflow demo``: receipt A accepted, receipt B rejected with a deviation)
and a daily storage check run once through the real engine (bench/history_template.py); then N
finished runs (11 accepted receipts, 1 rejected, 8 storage checks in every 20), one every 10
minutes into the past, and ``--open`` receipts waiting on a cell-lab technician or a pharmacist,
each a copy of the template's rows with fresh ids written through the record's own writer
(``flows.record.ledger.append_many``: the same rows and chain as ``append``, in bulk; see
bench/history_build.py). ``audit verify`` checks every built database before it is used.
Built databases are kept under ``--cache`` (SQLite files; PostgreSQL databases ``histbench_*``,
named in the cache), keyed by the code they were built with, so a re-run skips the build.

Figures, each at every size on each database, with its growth against N = 1,000:

- the inbox in process (``flows.services.inbox.inbox``) and the runs list (``list_runs``);
- the web inbox: ``--users`` signed-in users requesting ``GET /inbox`` at once against a real
  ``sopflow web`` process, p50 and p95, failures counted;
- ``sopflow inbox`` and ``sopflow runs``: wall time of the command;
- one executor sweep in process (every periodic job of a worker, ``Executor.sweep_once``);
- the idle worker's CPU (``python -m flows.services.worker``, from /proc/<pid>/stat);
- ``sopflow audit verify``, full (with its peak memory) and incremental (n/a without such an option).

Every figure carries the 1-minute load average when it started; every measurement runs in a
process of its own under ``--timeout`` and one that runs longer is printed ``> T s``. It asserts
nothing; the targets at N = 100,000 are printed beside the figures with PASS or FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/history.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench.history_measure import Fig  # noqa: E402  (after the path is set)
from bench.history_template import STAFF_PASSWORD, staff_name  # noqa: E402

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432"
TARGETS = {  # at N = 100,000: (limit, unit)
    "web_p95": 0.100,
    "cli_inbox": 0.3,
    "cli_runs": 0.3,
    "sweep": 0.050,
    "idle_cpu": 2.0,
    "audit_incremental": 1.0,
}
MEASURES = ("audit", "inbox", "runs", "cli", "sweep", "web", "idle")
"""What ``--only`` picks from: ``audit`` is the full and the incremental verify, ``cli`` both commands."""
RATIO_TARGET = 1.5
NO_RATIO_TARGET = {"audit_full"}
"""A full verify reads every event by definition: its target is throughput and memory (issue 11, part 3)."""
LABELS = {
    "inbox": "inbox, in process",
    "runs": "runs list, in process",
    "web_p50": "web inbox p50",
    "web_p95": "web inbox p95",
    "cli_inbox": "`sopflow inbox`",
    "cli_runs": "`sopflow runs`",
    "sweep": "one executor sweep",
    "idle_cpu": "idle worker CPU",
    "audit_full": "`audit verify`, full",
    "audit_incremental": "`audit verify`, incremental",
}


# -- set-up -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def code_key(users: int) -> str:
    """What a cached database depends on: what shapes its rows and chain (the schema's migrations, the
    table definitions, the bench's builder and template), the SOPs, the templates, the users. Reads,
    verification and the web may change without a rebuild: a database built before a change to them is
    the same history, and ``audit verify`` checks every database before it is measured."""
    h = hashlib.sha256(f"users={users}".encode())
    for folder, pattern in (
        ("flows/record/migrations", "**/*.py"),
        ("flows/record", "tables.py"),
        ("flows/builtin", "*"),
        ("sops/demo_hospital", "*"),
        ("templates", "**/*"),
    ):
        for p in sorted((REPO / folder).glob(pattern)):
            if p.is_file():
                h.update(str(p.relative_to(REPO)).encode() + p.read_bytes())
    for name in ("history_template.py", "history_build.py"):
        h.update((REPO / "bench" / name).read_bytes())
    return h.hexdigest()[:10]


def say(line: str) -> None:
    print(line, flush=True)


def pg_admin(server: str) -> Any:
    from sqlalchemy import create_engine

    return create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")


def pg_exists(server: str, name: str) -> bool:
    from sqlalchemy import text

    eng = pg_admin(server)
    with eng.connect() as c:
        found = c.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
    eng.dispose()
    return found


def pg_do(server: str, *statements: str) -> None:
    from sqlalchemy import text

    eng = pg_admin(server)
    with eng.connect() as c:
        for st in statements:
            c.execute(text(st))
    eng.dispose()


# -- building ---------------------------------------------------------------------------------------
class Builder:
    def __init__(self, cache: Path, key: str, users: int, n_open: int, pg: str) -> None:
        self.cache, self.key, self.users, self.n_open, self.pg = cache, key, users, n_open, pg
        self.dir = cache / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._template: Any = None
        self.built_pg: list[str] = []

    def template(self) -> Any:
        from bench.history_build import load_template
        from bench.history_template import make_template

        if self._template is None:
            db = self.dir / "template" / "sopflow.db"
            if not (self.dir / "template.done").exists():
                shutil.rmtree(self.dir / "template", ignore_errors=True)
                t0 = time.perf_counter()
                say("template: running `sopflow demo` and a storage check through the real engine…")
                make_template(self.dir / "template", self.users)
                (self.dir / "template.done").write_text(f"{time.perf_counter() - t0:.1f}\n")
                say(f"template: done in {time.perf_counter() - t0:.0f} s (load {os.getloadavg()[0]:.2f})")
            self._template = load_template(str(db))
        return self._template

    def database(self, db: str, n: int) -> tuple[str, str]:
        """The cached database of N finished runs + the open ones, built when missing: (url, note)."""
        name = f"{db}-{n}-o{self.n_open}"
        done = self.dir / f"{name}.done"
        if db == "sqlite":
            path = self.dir / f"{name}.db"
            url = f"sqlite:///{path}"
        else:
            pg_name = f"histbench_{self.key}_{n}_o{self.n_open}"
            url = f"{self.pg}/{pg_name}"
        if done.exists() and (db == "sqlite" or pg_exists(self.pg, url.rsplit("/", 1)[1])):
            return url, done.read_text().strip()
        if db == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        else:
            pg_do(self.pg, f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)', f'CREATE DATABASE "{pg_name}"')
            self.built_pg.append(pg_name)
        note = self._build(url, n)
        done.write_text(note + "\n")
        return url, note

    def grow(self, url: str, runs: int = 30) -> int:
        """Append ``runs`` accepted receipts finished in the last hours to ``url`` (a work copy),
        through the same writer: about 1,350 events for an incremental verify to walk. Returns the events."""
        from bench.history_build import write_runs

        _, bundles, _ = self.template()
        now = datetime.now(UTC)
        starts = [now - timedelta(hours=3) + timedelta(minutes=5 * i) for i in range(runs)]
        return write_runs(url, bundles, ["accepted"] * runs, starts, 10_000_000)

    def _build(self, url: str, n: int) -> str:
        from bench.history_build import finished_plan, open_plan, write_base, write_runs
        from flows.record.db import get_engine

        base, bundles, docs = self.template()
        now = datetime.now(UTC)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        write_base(url, base, docs)
        kinds, starts = finished_plan(n, now)
        last = [t0]

        def progress(done: int) -> None:
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                rate = done / (last[0] - t0)
                say(f"  … {done:,} of {n:,} runs ({rate:,.0f} runs/s)")

        events = write_runs(url, bundles, kinds, starts, 0, progress)
        kinds, starts = open_plan(self.n_open, now)
        events += write_runs(url, bundles, kinds, starts, n)
        elapsed = time.perf_counter() - t0
        engine = get_engine(url)
        if url.startswith("sqlite"):
            with engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            with engine.connect() as c:
                c.exec_driver_sql("COMMIT")
                c.exec_driver_sql("VACUUM ANALYZE")
        engine.dispose()
        note = (
            f"built in {elapsed:.0f} s: {(n + self.n_open) / elapsed:,.0f} runs/s, {events / elapsed:,.0f} events/s, "
            f"{events:,} events (load {load:.2f})"
        )
        say(f"  {note}")
        return note


# -- one database, one size -----------------------------------------------------------------------------
def env_for(home: Path, url: str, api_url: str) -> dict[str, str]:
    # Without PYTHONDONTWRITEBYTECODE (set on some build machines): an installed sopflow runs from
    # compiled bytecode, so each command's first (untimed) run writes it, as a pip install would.
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOPFLOW_", "PREFECT_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    return {
        **keep,
        "SOPFLOW_HOME": str(home),
        "SOPFLOW_DATABASE_URL": url,
        "SOPFLOW_PREFECT_API_URL": api_url,
        "PREFECT_API_URL": api_url,
        "SOPFLOW_PASSWORD": STAFF_PASSWORD,
        "SOPFLOW_NOTIFY_CONFIG": str(home / "notify.yaml"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(REPO),
    }


def work_copy(db: str, url: str, root: Path, pg: str) -> str:
    """A copy of the cached database to measure on (sign-ins and sweeps write to it), on disk
    before the first figure: writing back a copy of up to 5 GB (and PostgreSQL's checkpoint of
    it) would otherwise run under the measurements of the biggest history only."""
    if db == "sqlite":
        src = Path(url.split("///", 1)[1])
        dst = root / "work.db"
        shutil.copyfile(src, dst)
        os.sync()
        return f"sqlite:///{dst}"
    name = f"histbench_work_{os.getpid()}"
    pg_do(
        pg,
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        f'CREATE DATABASE "{name}" TEMPLATE "{url.rsplit("/", 1)[1]}"',
        "CHECKPOINT",
    )
    os.sync()
    return f"{pg}/{name}"


def drop_copy(db: str, url: str, pg: str) -> None:
    from flows.record.db import get_engine

    with contextlib.suppress(Exception):
        get_engine(url).dispose()
    if db != "sqlite":
        pg_do(pg, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def measure(args: argparse.Namespace, db: str, url: str, api_url: str, builder: Builder) -> dict[str, Fig]:
    from bench import history_measure as m

    figs: dict[str, Fig] = {}
    with tempfile.TemporaryDirectory(prefix="histbench-") as tmp:
        root = Path(tmp)
        home = root / "home"
        (home / "run").mkdir(parents=True)
        work = work_copy(db, url, root, args.postgres)
        try:
            env = env_for(home, work, api_url)
            user = staff_name(0)
            t = args.timeout
            want = args.only_set
            if "audit" in want:  # first: it proves the copy sound
                full, incr = m.audit_verify(env, t, args.incremental_flag, lambda: builder.grow(work))
                figs["audit_full"], figs["audit_incremental"] = full, incr
            if "inbox" in want:
                figs["inbox"] = m.probe(env, "inbox", user, args.repeats, t)
            if "runs" in want:
                figs["runs"] = m.probe(env, "runs", user, args.repeats, t)
            if "cli" in want:
                figs["cli_inbox"] = m.cli(env, ["inbox", "--as", user], args.repeats, t)
                figs["cli_runs"] = m.cli(env, ["runs"], args.repeats, t)
            if "sweep" in want:
                figs["sweep"] = m.probe(env, "sweep", user, args.repeats, t)
            if "web" in want:
                users = [staff_name(i) for i in range(args.users)]
                p95 = m.web(env, home, free_port(), users, STAFF_PASSWORD, args.rounds, t, args.web_workers)
                figs["web_p95"] = p95
                p50 = p95.extra.get("p50")
                figs["web_p50"] = Fig(
                    None if p95.extra.get("p50_over") else p50, p95.load, t if p95.extra.get("p50_over") else None
                )
            if "idle" in want:
                figs["idle_cpu"] = m.idle_cpu(env, home, args.settle, args.idle)
        finally:
            drop_copy(db, work, args.postgres)
    return figs


# -- report -----------------------------------------------------------------------------------------
def shown(key: str, f: Fig) -> str:
    if f.value is None:
        return f"> {f.limit:.0f} s" if f.limit else "n/a"
    if key == "idle_cpu":
        return f"{f.value:6.1f} %"
    return f"{f.value * 1000:8.1f} ms" if f.value < 10 else f"{f.value:8.1f} s "


def ratio(key: str, f: Fig, ref: Fig | None) -> tuple[str, float | None]:
    if ref is None or ref.value in (None, 0) or f.value is None:
        if f.value is None and f.limit and ref is not None and ref.value:
            return f"> x{f.limit / ref.value:.1f}", f.limit / ref.value
        return "", None
    r = f.value / ref.value
    return f"x{r:.2f}", r


def report(results: dict[tuple[str, int], dict[str, Fig]], sizes: list[int], dbs: list[str]) -> list[str]:
    ref_n = 1000 if 1000 in sizes else min(sizes)
    top = 100_000
    lines = [f"\nfigures (growth against N = {ref_n:,}; targets at N = {top:,})"]
    verdicts: list[str] = []
    for key, label in LABELS.items():
        lines.append(f"  {label}")
        for db in dbs:
            for n in sizes:
                f = results.get((db, n), {}).get(key)
                if f is None:
                    continue
                ref = results.get((db, ref_n), {}).get(key)
                rtext, r = ratio(key, f, ref)
                target = ""
                if n == top:
                    checks = []
                    if key in TARGETS:
                        limit = TARGETS[key]
                        ok = f.value is not None and f.value <= limit
                        if f.value is None and not f.limit:
                            checks.append("n/a")
                        else:
                            unit = "%" if key == "idle_cpu" else " s"
                            checks.append(f"≤ {limit:g}{unit}: {'PASS' if ok else 'FAIL'}")
                    if key not in NO_RATIO_TARGET and n != ref_n and (r is not None or f.limit):
                        checks.append(
                            f"growth ≤ {RATIO_TARGET}: {'PASS' if r is not None and r <= RATIO_TARGET else 'FAIL'}"
                        )
                    target = "   target " + ", ".join(checks) if checks else ""
                    verdicts += [f"  {db:10s} {label}: {c}" for c in checks]
                lines.append(
                    f"    {db:10s} N={n:>7,}  {shown(key, f):>11s}  {rtext:>8s}  load {f.load:5.2f}  {f.note}{target}"
                )
                if key == "sweep" and f.extra.get("jobs"):
                    jobs = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in f.extra["jobs"].items())
                    lines.append(f"{'':34s}jobs: {jobs}")
    if verdicts:
        lines.append(f"\ntargets at N = {top:,}:")
        lines += verdicts
    else:
        lines.append(f"\ntargets at N = {top:,}: not measured (--sizes has no {top})")
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default=None, help="finished runs, comma-separated (1000,10000,100000; --quick 200,1000)")
    p.add_argument("--db", default="sqlite,postgresql", help="sqlite, postgresql or both")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "history-cache")
    p.add_argument("--users", type=int, default=20, help="signed-in web users at once")
    p.add_argument("--open", type=int, default=200, help="open runs waiting at human steps")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds before a measurement is cut off")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each in-process figure and command")
    p.add_argument("--rounds", type=int, default=5, help="inbox requests each web user makes")
    p.add_argument(
        "--web-workers", type=int, default=os.cpu_count() or 1, help="`sopflow web --workers` (default: one per core)"
    )
    p.add_argument("--idle", type=float, default=30.0, help="seconds the idle worker is watched")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the worker is ready before watching")
    p.add_argument("--postgres", default=PG_DEFAULT, help="PostgreSQL server (trust auth)")
    p.add_argument("--incremental-flag", default=None, help="the option of `audit verify` that verifies incrementally")
    p.add_argument("--build-only", action="store_true", help="build (or find) the databases and stop")
    p.add_argument(
        "--only", default=",".join(MEASURES), help=f"what to measure, comma-separated: {', '.join(MEASURES)}"
    )
    p.add_argument("--no-keep", action="store_true", help="drop the PostgreSQL databases built by this run at the end")
    p.add_argument("--quick", action="store_true", help="a smoke run: sizes 200,1000, few users, short waits")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or "200,1000"
        args.users, args.open, args.repeats, args.rounds = 3, 20, 1, 2
        args.idle, args.settle, args.timeout = 5.0, 2.0, min(args.timeout, 120.0)
    args.sizes = args.sizes or "1000,10000,100000"
    try:
        args.size_list = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    except ValueError:
        p.error(f"--sizes: expected comma-separated whole numbers, got {args.sizes!r}")
    args.db_list = [d.strip() for d in args.db.split(",") if d.strip()]
    if unknown := [d for d in args.db_list if d not in ("sqlite", "postgresql")]:
        p.error(f"--db: unknown {', '.join(unknown)}; expected sqlite, postgresql or both")
    if not 1 <= args.users <= 20 and not args.quick:
        p.error("--users: from 1 to 20 (the template has 20 staff accounts)")
    args.only_set = {x.strip() for x in args.only.split(",") if x.strip()}
    if unknown := sorted(args.only_set - set(MEASURES)):
        p.error(f"--only: unknown {', '.join(unknown)}; expected some of {', '.join(MEASURES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import platform

    from flows.config import get_settings
    from flows.services import server

    args = parse(argv)
    say(
        f"bench/history.py: sizes {args.size_list}, databases {args.db_list}, {args.open} open runs, "
        f"{args.users} web users; {os.cpu_count()} cores, {platform.python_version()}, load {os.getloadavg()[0]:.2f}"
    )
    key = code_key(20)
    builder = Builder(args.cache, key, 20, args.open, args.postgres)
    builder.template()
    if args.build_only:
        for db in args.db_list:
            for n in args.size_list:
                url, note = builder.database(db, n)
                say(f"{db}, N = {n:,}: {url.rsplit('/', 1)[-1]} ({note})")
        return 0
    results: dict[tuple[str, int], dict[str, Fig]] = {}
    with tempfile.TemporaryDirectory(prefix="histbench-prefect-") as tmp:
        # One Prefect server (SQLite, its own home) for the sweeps and the workers; sopflow's own start path.
        settings = replace(get_settings(), home=Path(tmp), prefect_port=free_port(), prefect_api_url=None)
        settings = replace(settings, prefect_database_url=f"sqlite+aiosqlite:///{Path(tmp) / 'prefect' / 'prefect.db'}")
        server.start(settings, executor=False, timeout=300)
        try:
            # The work pool and deployment the worker and the executor's sweep use: `sopflow server deploy`.
            deploy_env = env_for(Path(tmp), "sqlite:///" + str(Path(tmp) / "unused.db"), settings.api_url)
            subprocess.run([sys.executable, "-m", "flows", "server", "deploy"], env=deploy_env, check=True, cwd=REPO)
            for db in args.db_list:
                for n in args.size_list:
                    say(f"\n{db}, N = {n:,} finished runs + {args.open} open:")
                    url, note = builder.database(db, n)
                    say(f"  database {url.rsplit('/', 1)[-1]} ({note})")
                    results[(db, n)] = figs = measure(args, db, url, settings.api_url, builder)
                    for k, f in figs.items():
                        say(f"  {LABELS[k]:30s} {shown(k, f):>11s}  load {f.load:5.2f}  {f.note}")
        finally:
            server.stop(settings)
            if args.no_keep:
                for name in builder.built_pg:
                    pg_do(args.postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for line in report(results, args.size_list, args.db_list):
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
