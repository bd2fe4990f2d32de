"""deploy/ stays true to the program (issue 13): the compose file describes the production topology
(PostgreSQL, a Prefect server, two workers, web); every command the systemd units and the compose
services run exists; every setting their environment files name is one sopflow reads. The topology
itself runs as processes in scripts/smoke (CI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _commands() -> set[tuple[str, ...]]:
    from typer.main import get_command

    from flows.cli import app

    root = get_command(app)
    out: set[tuple[str, ...]] = set()
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        out |= {(name, s) for s in subs} if subs else {(name,)}
    return out


def _runs_something_real(argv: list[str]) -> None:
    exe = Path(argv[0]).name
    if exe == "sopflow":
        assert tuple(argv[1:2]) in _commands() or tuple(argv[1:3]) in _commands(), argv
    elif exe == "python":
        assert argv[1:3] in (["-m", "flows.services.worker"], ["-c", argv[2]]), argv
        if argv[1] == "-m":
            assert (REPO / "flows" / "services" / "worker.py").is_file()
    elif exe == "prefect":
        assert argv[1:3] == ["server", "start"], argv
    else:
        pytest.fail(f"unknown program {argv[0]!r}")


def test_deploy_compose_has_the_production_topology():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker-1", "worker-2", "web"} <= set(services)
    for svc in services.values():
        if "command" in svc:
            _runs_something_real(svc["command"])
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    for worker in ("worker-1", "worker-2"):
        assert "results:/srv/sopflow-results" in services[worker]["volumes"]


@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service")))
def test_deploy_systemd_units_run_real_commands(unit: str):
    text = (DEPLOY / "systemd" / unit).read_text(encoding="utf-8")
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", text, re.MULTILINE)
    _runs_something_real(shlex.split(exec_start.replace("%i", "8000")))
    assert re.search(r"^User=sopflow$", text, re.MULTILINE)


@pytest.mark.parametrize("env_file", ["sopflow.env", "compose.env"])
def test_deploy_environment_files_name_only_real_settings(env_file: str):
    known = set(re.findall(r"SOPFLOW_[A-Z_]+", (REPO / "flows" / "config.py").read_text(encoding="utf-8")))
    named = set(re.findall(r"^#?(SOPFLOW_[A-Z_]+)=", (DEPLOY / env_file).read_text(encoding="utf-8"), re.MULTILINE))
    assert named
    assert named - known == set()


def test_deploy_image_has_the_system_libraries_the_makefile_installs():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    wanted = set(re.search(r"^SYSTEM_PACKAGES := (.+)$", makefile, re.MULTILINE).group(1).split()) - {"chromium"}
    image = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    assert {p for p in wanted if p not in image} == set()
