"""bench/history.py's in-process figures, each in a child process of its own (so a slow one can be
stopped at its time limit): ``python bench/history_probe.py KIND USER REPEATS``.

Kinds (the entry points the CLI and the web call):

    inbox       flows.services.inbox.inbox(settings, user)
    inbox_view  flows.services.views.inbox_view(settings, user, "en")   (what the web's inbox renders)
    runs        flows.services.runs.list_runs(settings)
    sweep       one sweep of the executor: every periodic job of a worker (flows.engine.executor
                ``Executor.sweep_once`` with the floors' jobs, flows.services._worker_type.floor_jobs)

One warm-up call (imports, connections, caches), then REPEATS timed calls. Prints one JSON line
per call: ``{"phase": "warm"|"timed", "s": seconds, "load": 1-min load average, ...}``.
Settings come from the environment (``SOPFLOW_HOME``, ``SOPFLOW_DATABASE_URL``, ...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _call(kind: str, user: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """The call to time and what to close afterwards."""
    from flows.config import get_settings

    settings = get_settings()
    if kind == "inbox":
        from flows.services.inbox import inbox

        return lambda: inbox(settings, user), lambda: None
    if kind == "inbox_view":
        from flows.services.views import inbox_view

        return lambda: inbox_view(settings, user, "en"), lambda: None
    if kind == "runs":
        from flows.services.runs import list_runs

        return lambda: list_runs(settings), lambda: None
    if kind == "sweep":
        from flows.engine.executor import Executor
        from flows.services._worker_type import floor_jobs

        ex = Executor(settings=settings, jobs=floor_jobs(), name="bench-history-sweep")
        from prefect.client.orchestration import get_client

        client = get_client(sync_client=True)
        client.__enter__()
        ex._sweep_client = client  # what the executor's sweeper thread sets before its first sweep
        jobs = ex.jobs
        per_job: dict[str, float] = {}

        def timed_job(name: str, fn: Callable[[Any], object]) -> Callable[[Any], object]:
            def run(s: Any) -> object:
                t0 = time.perf_counter()
                try:
                    return fn(s)
                finally:
                    per_job[name] = time.perf_counter() - t0

            return run

        ex.jobs = [(name, timed_job(name, fn)) for name, fn in jobs]

        def sweep() -> dict[str, float]:
            per_job.clear()
            ex.sweep_once()
            return dict(per_job)

        def close() -> None:
            client.__exit__(None, None, None)
            ex.wakeup.close()
            ex.client.__exit__(None, None, None)

        return sweep, close
    raise SystemExit(f"unknown probe {kind!r}")


def main(argv: list[str]) -> None:
    kind, user, repeats = argv[0], argv[1], int(argv[2])
    fn, close = _call(kind, user)
    try:
        for i in range(repeats + 1):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - t0
            line: dict[str, Any] = {"phase": "warm" if i == 0 else "timed", "s": elapsed, "load": load}
            if isinstance(result, list):
                line["items"] = len(result)
            elif isinstance(result, dict):
                line["jobs"] = result
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
    finally:
        close()


if __name__ == "__main__":
    main(sys.argv[1:])
