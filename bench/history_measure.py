"""bench/history.py's measurements against one database: each figure through the entry point people
and the worker use, in a process of its own, under a time limit (a figure that would take longer is
reported as ``> T s``), with the 1-minute load average taken when it started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INCREMENTAL_FLAGS = ("--incremental", "--since-checkpoint", "--from-checkpoint", "--since-last", "--checkpoint")


@dataclass
class Fig:
    """One figure: ``value`` (seconds, or % of a core), None when it ran past ``limit``."""

    value: float | None
    load: float
    limit: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _popen(argv: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)  # noqa: S603


def _kill(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run_timed(argv: list[str], env: dict[str, str], limit: float) -> tuple[float | None, int, int]:
    """Wall time, exit code and peak memory (KB) of one command; (None, -1, 0) past ``limit``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=REPO
    )
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            elapsed = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[2:])} exited {proc.returncode}: {err.strip()[-2000:]}")
            return elapsed, proc.returncode, int(usage.ru_maxrss)
        if time.perf_counter() - t0 > limit:
            _kill(proc, grace=5)
            return None, -1, 0
        time.sleep(0.01)


def cli(env: dict[str, str], args: list[str], repeats: int, limit: float) -> Fig:
    """Median wall time of ``sopflow ARGS`` (output discarded), after one untimed warm-up; fewer
    repeats once ``limit`` seconds have gone by (at least one)."""
    load = os.getloadavg()[0]
    argv = [sys.executable, "-m", "flows", *args]
    times: list[float] = []
    t0 = time.perf_counter()
    for i in range(repeats + 1):
        elapsed, _, _ = run_timed(argv, env, limit)
        if elapsed is None:
            return Fig(None, load, limit)
        if i:
            times.append(elapsed)
            if time.perf_counter() - t0 > limit:
                break
    return Fig(statistics.median(times), load, note=f"runs {' '.join(f'{t:.2f}' for t in times)}")


def probe(env: dict[str, str], kind: str, user: str, repeats: int, limit: float) -> Fig:
    """An in-process figure (bench/history_probe.py): the median of ``repeats`` calls after a warm-up."""
    load = os.getloadavg()[0]
    argv = [sys.executable, str(REPO / "bench" / "history_probe.py"), kind, user, str(repeats)]
    proc = subprocess.Popen(  # noqa: S603
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd=REPO
    )
    lines: list[dict[str, Any]] = []

    def read() -> None:
        for raw in proc.stdout or ():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill(proc, grace=5)
    reader.join(timeout=5)
    timed = [x for x in lines if x.get("phase") == "timed"]
    if proc.returncode not in (0, None) and not timed and proc.returncode > 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"probe {kind} failed: {err.strip()[-2000:]}")
    if not timed:  # not even one call finished: the warm-up (or the first call) ran past the limit
        first = lines[0]["s"] if lines else None
        return Fig(None, load, limit, note=f"warm-up {first:.2f} s" if first else "")
    values = [x["s"] for x in timed]
    fig = Fig(statistics.median(values), load, note=f"{len(values)} calls, {timed[-1].get('items', '')} items")
    if kind == "sweep":
        jobs: dict[str, list[float]] = {}
        for x in timed:
            for name, s in (x.get("jobs") or {}).items():
                jobs.setdefault(name, []).append(s)
        fig.extra["jobs"] = {k: statistics.median(v) for k, v in jobs.items()}
        fig.note = f"{len(values)} sweeps"
    return fig


def idle_cpu(env: dict[str, str], home: Path, settle: float, window: float) -> Fig:
    """% of one core the real worker (``python -m flows.services.worker``) uses while nothing happens."""
    ready = home / "run" / "executor.ready"
    ready.unlink(missing_ok=True)
    proc = _popen([sys.executable, "-m", "flows.services.worker"], env, home / "worker.log")
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {home / 'worker.log'}")
            time.sleep(0.1)
        time.sleep(settle)
        load = os.getloadavg()[0]
        hz = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / hz  # utime + stime (fields 14, 15)

        c0, t0 = cpu(), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu(), time.monotonic()
        sweeps = (
            (home / "run" / "executor.sweeps").read_text().split()[0]
            if (home / "run" / "executor.sweeps").exists()
            else "0"
        )
        return Fig(100.0 * (c1 - c0) / (t1 - t0), load, note=f"{window:.0f} s idle, {sweeps} sweeps since start")
    finally:
        _kill(proc)


def web(
    env: dict[str, str],
    home: Path,
    port: int,
    users: list[str],
    password: str,
    rounds: int,
    limit: float,
    workers: int = 1,
) -> Fig:
    """p50 and p95 of ``GET /inbox`` from ``users`` signed-in users at once, each ``rounds`` times in a
    row (none started after ``limit`` seconds), against a real ``sopflow web --workers WORKERS``. Failed requests (an HTTP error) are counted apart;
    requests past ``limit`` seconds count as ``limit`` (and the p95 is then reported as ``> limit``)."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "flows", "web", "--port", str(port), "--workers", str(workers)]
    proc = _popen(argv, env, home / "web.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/login", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sopflow web did not start; see {home / 'web.log'}")
            time.sleep(0.2)
        clients = []
        for u in users:
            c = httpx.Client(base_url=base, timeout=limit, follow_redirects=False)
            page = c.get("/login")
            m = re.search(r'name="csrf" value="([^"]+)"', page.text)
            if not m:
                raise RuntimeError("the login page has no CSRF field")
            r = c.post("/login", data={"csrf": m.group(1), "username": u, "password": password, "next": "/inbox"})
            if r.status_code != 303:
                raise RuntimeError(f"{u} could not sign in: HTTP {r.status_code}")
            clients.append(c)
        load = os.getloadavg()[0]
        times: list[float] = []
        failures: list[str] = []
        slow = 0
        guard = threading.Lock()
        start = threading.Barrier(len(clients))

        stop_at = [0.0]

        def user(c: httpx.Client) -> None:
            nonlocal slow
            start.wait()
            stop_at[0] = stop_at[0] or time.perf_counter() + limit
            for _ in range(rounds):
                if time.perf_counter() > stop_at[0]:  # no new request after ``limit`` seconds
                    break
                t0 = time.perf_counter()
                try:
                    r = c.get("/inbox")
                    ok = r.status_code == 200 and "<html" in r.text.lower()
                    why = f"HTTP {r.status_code}"
                except httpx.TimeoutException:
                    with guard:
                        slow += 1
                        times.append(limit)
                    continue
                except httpx.HTTPError as exc:
                    ok, why = False, type(exc).__name__
                with guard:
                    (times if ok else failures).append(time.perf_counter() - t0 if ok else why)  # type: ignore[arg-type]

        threads = [threading.Thread(target=user, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in clients:
            c.close()
        s = sorted(times)
        p50 = statistics.median(s) if s else None
        p95 = s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))] if s else None
        over = p95 is not None and p95 >= limit
        fig = Fig(None if over else p95, load, limit if over else None)
        fig.extra = {"p50": p50, "p50_over": p50 is not None and p50 >= limit, "requests": len(s) + len(failures)}
        fig.note = f"{len(users)} users x {rounds}, {workers} web worker(s); {len(failures)} failed" + (
            f", {slow} past {limit:.0f} s" if slow else ""
        )
        if failures:
            fig.note += f" ({', '.join(sorted(set(failures))[:3])})"
        return fig
    finally:
        _kill(proc)


def audit_verify(
    env: dict[str, str], limit: float, flag: str | None, grow: Callable[[], int] | None = None
) -> tuple[Fig, Fig]:
    """``sopflow audit verify``, full and incremental (``flag``, or the first of ``INCREMENTAL_FLAGS``
    its --help names; n/a when it has none). Returns (full, incremental).

    As the worker does, a signed checkpoint (``sopflow audit checkpoint``) covers the head before the
    full walk, which keeps it as verified; then ``grow()`` appends what happened since (it returns the
    events written), another checkpoint covers it, and the incremental walk starts from the verified one."""
    argv = [sys.executable, "-m", "flows", "audit", "verify"]
    run_timed([sys.executable, "-m", "flows", "audit", "checkpoint"], env, limit)
    load = os.getloadavg()[0]
    elapsed, _, rss = run_timed(argv, env, limit)
    full = Fig(elapsed, load, None if elapsed is not None else limit, note=f"peak {rss / 1024:.0f} MB" if rss else "")
    full.extra["rss_kb"] = rss
    helptext = subprocess.run([*argv, "--help"], env=env, capture_output=True, text=True, check=False).stdout  # noqa: S603
    chosen = flag or next((f for f in INCREMENTAL_FLAGS if re.search(rf"{re.escape(f)}\b", helptext)), None)
    if chosen is None or chosen not in helptext:
        return full, Fig(None, os.getloadavg()[0], note="n/a: `sopflow audit verify` has no incremental option here")
    added = grow() if grow is not None else 0
    run_timed([sys.executable, "-m", "flows", "audit", "checkpoint"], env, limit)
    load = os.getloadavg()[0]
    elapsed, _, rss = run_timed([*argv, chosen], env, limit)
    return full, Fig(
        elapsed,
        load,
        None if elapsed is not None else limit,
        note=f"{chosen}, {added:,} new events, peak {rss / 1024:.0f} MB",
    )
