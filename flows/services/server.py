"""The service floor: start, stop and report the local Prefect server and sopflow's worker
(``python -m flows.services.worker``: the worker type ``sopflow`` on the pool ``sopflow``; its
process keeps the name ``executor`` in ``run/`` and in ``sopflow server status``).

The embedded default keeps everything under ``SOPFLOW_HOME``: the Prefect server's SQLite
database in ``prefect/``, its log and pid file in ``run/``. With ``SOPFLOW_PREFECT_API_URL`` set,
the Prefect server is someone else's and only the executor is started here. Stdlib only (the
processes started import Prefect, not this one).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flows.config import Settings
from flows.engine.env import prefect_env
from flows.errors import EngineError
from flows.record.db import init_db

__all__ = ["ProcessStatus", "api_healthy", "ready_file", "start", "status", "stop", "wait_healthy"]

_SERVICES = ("prefect-server", "executor")


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int | None
    alive: bool
    log: Path
    detail: str = ""


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.log"


def _read_pid(settings: Settings, name: str) -> int | None:
    try:
        return int(_pid_file(settings, name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:  # noqa: S310 (our own URL)
            return resp.status == 200 and json.loads(resp.read() or b"false") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


MIGRATIONS_LIMIT = 900.0
"""How long a local Prefect server that is alive and still starting is waited for: its first start
migrates its database, which on a busy machine (or on PostgreSQL) takes minutes, not seconds."""


def wait_healthy(settings: Settings, timeout: float = 90.0) -> None:
    """Wait until the Prefect API answers: ``timeout`` for a server elsewhere; for the local one, as
    long as its process is alive (its migrations may take minutes), up to ``MIGRATIONS_LIMIT``.

    Raises:
        EngineError: the local server exited, or the API did not answer in time.
    """
    start = time.monotonic()
    pid = _read_pid(settings, "prefect-server")
    local = settings.embedded_prefect and pid is not None
    limit = max(timeout, MIGRATIONS_LIMIT) if local else timeout
    while time.monotonic() - start < limit:
        if api_healthy(settings.api_url):
            return
        if local and not _alive(pid):
            raise EngineError(
                f"the local Prefect server exited while starting; see {_log_file(settings, 'prefect-server')}"
            )
        time.sleep(0.2)
    raise EngineError(
        f"the Prefect server at {settings.api_url} did not answer within {limit:.0f} s"
        + (f"; see {_log_file(settings, 'prefect-server')}" if local else "")
    )


def _spawn(settings: Settings, name: str, argv: list[str]) -> int:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **prefect_env(settings), "SOPFLOW_HOME": str(settings.home)}
    log = _log_file(settings, name).open("ab")
    proc = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        cwd=settings.home,
    )
    _pid_file(settings, name).write_text(f"{proc.pid}\n")
    return proc.pid


def start(settings: Settings, *, executor: bool = True, timeout: float = 90.0) -> list[ProcessStatus]:
    """Start what is not running yet (idempotent) and wait until the API answers.

    Raises:
        SchemaVersionError: the database is behind or ahead of this sopflow (nothing is started).
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    init_db(settings.database_url)  # refuse before starting anything: the worker would refuse later
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    if settings.embedded_prefect and not _alive(_read_pid(settings, "prefect-server")):
        if api_healthy(settings.api_url, timeout=0.5):
            raise EngineError(
                f"port {settings.prefect_port} already has a Prefect server that sopflow did not start; "
                "stop it or set SOPFLOW_PREFECT_PORT"
            )
        argv = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.prefect_port),
        ]
        _spawn(settings, "prefect-server", argv)
    wait_healthy(settings, timeout)
    if executor and not _alive(_read_pid(settings, "executor")):
        ready_file(settings).unlink(missing_ok=True)
        pid = _spawn(settings, "executor", [sys.executable, "-m", "flows.services.worker"])
        deadline = time.monotonic() + max(timeout, 300.0)  # imports and the first API calls, on a busy machine
        while not _ready(settings, pid):
            if not _alive(pid):
                raise EngineError(f"the worker exited while starting; see {_log_file(settings, 'executor')}")
            if time.monotonic() > deadline:
                raise EngineError(f"the worker did not get ready in time; see {_log_file(settings, 'executor')}")
            time.sleep(0.1)
    return status(settings)


def ready_file(settings: Settings) -> Path:
    """Written by the executor once its deployment is registered and it polls."""
    return settings.run_dir / "executor.ready"


def _ready(settings: Settings, pid: int) -> bool:
    try:
        return int(ready_file(settings).read_text().split()[0]) == pid
    except (OSError, ValueError, IndexError):
        return False


def status(settings: Settings) -> list[ProcessStatus]:
    out = []
    for name in _SERVICES:
        pid = _read_pid(settings, name)
        alive = _alive(pid)
        detail = ""
        if name == "prefect-server":
            if not settings.embedded_prefect:
                detail = f"external: {settings.api_url}"
                alive = api_healthy(settings.api_url)
                pid = None
            elif alive:
                detail = "healthy" if api_healthy(settings.api_url) else "starting or not answering"
        out.append(ProcessStatus(name, pid, alive, _log_file(settings, name), detail))
    return out


def stop(settings: Settings, *, timeout: float = 20.0) -> list[str]:
    """Stop the executor, then the server; returns what was stopped."""
    stopped = []
    for name in reversed(_SERVICES):
        pid = _read_pid(settings, name)
        if pid is None or not _alive(pid):
            _pid_file(settings, name).unlink(missing_ok=True)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _pid_file(settings, name).unlink(missing_ok=True)
        stopped.append(name)
    return stopped
