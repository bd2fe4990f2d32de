"""bench/engine.py's installation: PostgreSQL databases for ``--postgres`` and extra sopflow workers,
each a process with its own home (as on separate machines), sharing the databases and the API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def create_databases(server: str, names: tuple[str, ...]) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()


def drop_databases(server: str, names: tuple[str, ...]) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def start_workers(settings: Any, root: Path, count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` more workers, each with its own SOPFLOW_HOME under ``root``; waits until each polls."""
    procs = []
    for i in range(count):
        home = root / f"worker-{i + 2}"
        (home / "run").mkdir(parents=True)
        env = {**os.environ, "SOPFLOW_HOME": str(home), "SOPFLOW_PREFECT_API_URL": settings.api_url}
        log = (home / "worker.log").open("ab")
        argv = [sys.executable, "-m", "flows.services.worker"]
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
        procs.append(proc)
    for i, proc in enumerate(procs):
        ready = root / f"worker-{i + 2}" / "run" / "executor.ready"
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {i + 2} did not start; see {ready.parent / 'worker.log'}")
            time.sleep(0.1)
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
