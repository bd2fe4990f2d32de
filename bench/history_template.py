"""bench/history.py's template: the real demo run once, whose rows bench/history_build.py replays.

In a home of its own (``SOPFLOW_HOME``, its own local Prefect server on a free port, its own
executor), run in a child process so this process never imports Prefect:

1. ``sopflow demo`` (``flows.cli.demo.run_demo``): five staff, the demo institution established,
   receipt A accepted (seven steps, three signatures, the PDF, the ward told), receipt B rejected
   (transit excursion, a deviation, QA's signed disposition);
2. one daily storage check (``storage_daily_check``) signed by the cell-lab technician;
3. 20 more staff (the web's signed-in users), each a cell-lab technician, a pharmacist and a QA
   officer of the demo institution, trained on both SOPs.

Its SQLite database (``sopflow.db``) is the template: every row in it was written by the real
engine through the real services.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

INSTITUTION = "demo_hospital"
STAFF_PASSWORD = "bench-history-1"  # noqa: S105 (throw-away users in a benchmark database)
TANKS = ("LN2-01",)


def staff_name(i: int) -> str:
    return f"staff{i:02d}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_template(home: Path, users: int) -> Path:
    """Run the demo, a storage check and add ``users`` staff in ``home``; returns the database path."""
    import subprocess

    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SOPFLOW_HOME": str(home),
        "SOPFLOW_PREFECT_PORT": str(_free_port()),
        "SOPFLOW_DATABASE_URL": f"sqlite:///{home / 'sopflow.db'}",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    for k in ("SOPFLOW_PREFECT_API_URL", "PREFECT_API_URL", "SOPFLOW_NOTIFY_CONFIG"):
        env.pop(k, None)
    repo = Path(__file__).resolve().parent.parent
    code = f"import sys; sys.path.insert(0, {str(repo)!r}); from bench.history_template import _child; _child({users})"
    log = home / "template.log"
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise RuntimeError(f"the template (sopflow demo) failed; see {log}")
    return home / "sopflow.db"


def _child(users: int) -> None:
    """In the template's home: the demo, a storage check, the web's staff; stops what it started."""
    from rich.console import Console

    from flows.cli.demo import DEMO_USERS, QA, run_demo
    from flows.cli.receiver import LocalReceiver
    from flows.config import get_settings
    from flows.services import server
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.training import grant_training

    settings = get_settings()
    console = Console(file=sys.stdout, width=120)
    server.start(settings)
    try:
        if run_demo(settings, console, keep=True) != 0:
            raise RuntimeError("sopflow demo did not finish as expected")
        qa = Officer(QA, DEMO_USERS[QA][2])
        tech, tech_pw = "li.wei", DEMO_USERS["li.wei"][2]
        grant_training(settings, tech, INSTITUTION, "storage_daily_check", 1, trainer="Bench trainer", officer=qa)
        with LocalReceiver() as rx:  # the demo's receiver is gone: the checks' messages go to this one
            channels = sorted({role for _, role, _ in DEMO_USERS.values()} | {"cell_lab_lead"})
            settings.notify_config.write_text(
                f"{INSTITUTION}:\n" + "".join(f'  {r}: ["{rx.url(r)}"]\n' for r in channels), encoding="utf-8"
            )
            for tank in TANKS:
                _storage_check(settings, tank, tech, tech_pw)
        for i in range(users):
            name = staff_name(i)
            grants = [(INSTITUTION, r) for r in ("cell_lab", "pharmacist", "qa")]
            add_user(settings, name, f"Bench Staff {i:02d}", STAFF_PASSWORD, grants, officer=qa)
            for sop_id in ("dose_receipt", "storage_daily_check"):
                grant_training(settings, name, INSTITUTION, sop_id, 1, trainer="Bench trainer", officer=qa)
    finally:
        server.stop(settings)


def _storage_check(settings: Any, tank: str, tech: str, password: str) -> None:
    from datetime import UTC, datetime

    from flows.services.runs import start_run, wait_for_run
    from flows.services.signing import submit_step

    run = start_run(settings, INSTITUTION, "storage_daily_check", {"tank_id": tank}, tech, password)
    wait_for_run(settings, run.run_id, step="daily_check", timeout=300)
    values = {
        "checked_at": datetime.now(UTC).isoformat(),
        "temperature_c": "-182",
        "ln2_level_pct": "64",
        "alarm_test_ok": "yes",
        "backup_tank_ready": "yes",
    }
    submit_step(settings, run.run_id, "daily_check", tech, password, values)
    wait_for_run(settings, run.run_id, statuses=("completed",), timeout=300)
