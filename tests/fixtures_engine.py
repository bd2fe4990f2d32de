"""Engine fixtures: one real local Prefect server and one real sopflow executor per test session.

The environment is set when pytest starts (``pytest_configure``), before any test module
imports Prefect: Prefect reads its settings once, on import. Everything lives in a temporary
``SOPFLOW_HOME`` on a free port, so a developer's own ``~/.sopflow`` is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.config import Settings, get_settings
from tests.waiting import LIMIT

DEMO_STAFF = {
    # username: (printed name, role)
    "tech": ("Li Wei", "cell_lab"),
    "pharm": ("Zhang Min", "pharmacist"),
    "qa": ("Wang Fang", "qa"),
    "qm": ("Chen Jie", "quality_manager"),
    "doc": ("Zhao Lei", "physician"),
}
PASSWORD = "test-password-1"

ARRIVAL = {
    "arrived_at": "2026-11-25T09:40:00+08:00",
    "courier": "SF 1234",
    "shipper_id": "DS-0042",
    "seal_intact": "yes",
    "logger_max_c": "-171.5",
    "transit_hours": "18.5",
}
WEB_URL = "https://sopflow.hospital.example"
"""The web app's address the engine's notifications link to (``SOPFLOW_WEB_URL``)."""
PARAMS = {"product": "tecartus", "coi": "COI-TEST-0001", "lot": "LOT-1", "patient_id": "H0001"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _HOME
    _HOME = Path(tempfile.mkdtemp(prefix="sopflow-test-"))
    os.environ["SOPFLOW_HOME"] = str(_HOME)
    os.environ["SOPFLOW_PREFECT_PORT"] = str(free_port())
    os.environ.pop("SOPFLOW_DATABASE_URL", None)
    os.environ.pop("SOPFLOW_PREFECT_API_URL", None)
    os.environ.pop("SOPFLOW_NOTIFY_CONFIG", None)
    os.environ["SOPFLOW_WEB_URL"] = WEB_URL  # notifications link to the step's page there
    # The repository's institutions and the engine tests' own (tests/sops/engine/): the executor
    # loads a sub-run's SOP from the same folder.
    repo = Path(__file__).resolve().parent.parent
    sops = _HOME / "sops"
    sops.mkdir()
    for folder in [*(repo / "sops").iterdir(), *(repo / "tests" / "sops" / "engine").iterdir()]:
        if folder.is_dir():
            (sops / folder.name).symlink_to(folder)
    os.environ["SOPFLOW_SOPS_DIR"] = str(sops)
    from flows.engine.env import apply_prefect_env

    apply_prefect_env(get_settings())


def pytest_unconfigure(config: pytest.Config) -> None:
    if _HOME is not None:
        from flows.services import server

        server.stop(get_settings())
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(name="engine", scope="session")
def engine_fixture() -> Iterator[Settings]:
    """A running local Prefect server and worker, with the demo institution's staff, each trained
    on dose_receipt v1 (signers must be: ``state.signer_problem``), and the institution's SOP files
    established as its first Effective versions by QA (``sopflow sop establish``). The staff come in
    through the service floor as an installation's would: ``qa`` is the first account, and adds the
    others and records their training as the QA officer."""
    from flows.services import server
    from flows.services.accounts import add_user
    from flows.services.guard import Officer
    from flows.services.training import grant_training
    from flows.services.versions import establish

    settings = get_settings()
    server.start(settings)
    qa = Officer("qa", PASSWORD)
    for username in ["qa", *(u for u in DEMO_STAFF if u != "qa")]:
        name, role = DEMO_STAFF[username]
        add_user(
            settings, username, name, PASSWORD, [("demo_hospital", role)], officer=None if username == "qa" else qa
        )
    for username in DEMO_STAFF:
        grant_training(settings, username, "demo_hospital", "dose_receipt", 1, trainer="Test Trainer", officer=qa)
    establish(settings, "demo_hospital", qa)
    _establish_others(settings)
    yield settings
    server.stop(settings)


def _establish_others(settings: Settings) -> None:
    """Every other institution under sops/: its files become its first Effective versions, signed by
    a QA officer of its own (``est_<institution>``), so runs of its SOPs can start. An institution
    whose files are invalid is left out: its own tests then say it has no Effective version."""
    from flows.errors import FlowsError
    from flows.services.guard import Officer
    from flows.services.versions import establish
    from flows.sop.catalog import Catalog
    from tests.seed import seed_user

    for inst in Catalog(settings.sops_dir, settings.templates_dir).institutions():
        if inst == "demo_hospital":
            continue
        try:
            seed_user(settings, f"est_{inst}"[:40], f"QA of {inst}", PASSWORD, [(inst, "qa")])
            establish(settings, inst, Officer(f"est_{inst}"[:40], PASSWORD))
        except FlowsError as exc:
            import warnings

            warnings.warn(f"{inst}: not established for the engine tests: {exc}", stacklevel=1)


@pytest.fixture(name="receiver", scope="session")
def receiver_fixture(engine: Settings) -> Iterator[Any]:
    """A real loopback receiver that every role's notifications are delivered to by apprise."""
    from flows.cli.receiver import LocalReceiver

    with LocalReceiver() as rx:
        roles = sorted({r for _, r in DEMO_STAFF.values()})
        per_role = "".join(f'  {r}: ["{rx.url(r)}"]\n' for r in roles)
        # The demo institution and lang_hospital (the SOP-language engine tests) tell the same receiver.
        engine.notify_config.write_text(
            "".join(f"{inst}:\n{per_role}" for inst in ("demo_hospital", "lang_hospital")), encoding="utf-8"
        )
        yield rx
        engine.notify_config.unlink(missing_ok=True)


def wait_for(
    settings: Settings, run_id: str, *, step: str | None = None, statuses: tuple[str, ...] = (), timeout: float = LIMIT
) -> dict[str, Any]:
    """Wait until a run waits on ``step`` or has one of ``statuses``; returns its record."""
    from flows.services import runs as runs_service

    return runs_service.wait_for_run(settings, run_id, step=step, statuses=statuses, timeout=timeout)


def start_receipt(settings: Settings, **params: str) -> str:
    from flows.services import runs as runs_service

    return runs_service.start_run(
        settings, "demo_hospital", "dose_receipt", {**PARAMS, **params}, "qm", PASSWORD
    ).run_id


def sign(settings: Settings, run_id: str, step: str, user: str, values: dict[str, Any]) -> Any:
    from flows.services import signing as signing_service

    wait_for(settings, run_id, step=step)
    return signing_service.submit_step(settings, run_id, step, user, PASSWORD, values)
