"""README's "Using it" walkthrough, run as written (issue 14): every ``sh`` block of that section, in
order, on a fresh ``SOPFLOW_HOME`` with a real local Prefect server and executor of its own (another
port than the test session's), passwords from the environment as the README tells scripts to.

Two rules stand for what a person does at the screen:

- a line ``NAME=…`` sets ``NAME`` to the first id the command before it printed (the README says to
  copy it from the screen);
- before ``sopflow submit $RUN STEP`` the test waits until the run waits on STEP, as a person waits
  for it to show in the inbox (the engine opens a step a moment after the previous one is signed).

The test fails on the first command that exits non-zero, naming it with its output.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_engine import free_port
from tests.waiting import LIMIT

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PASSWORD = "walkthrough-pass-1"
BASH = "/bin/bash"
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VARIABLE = re.compile(r"^([A-Z][A-Z0-9_]*)=…")
_SUBMIT = re.compile(r"^sopflow submit \$([A-Z_]+) ([a-z0-9_#]+)")

pytestmark = pytest.mark.slow


def walkthrough_commands(text: str) -> list[str]:
    """The commands of the README's "Using it" section: its ``sh`` blocks, continuation lines joined,
    blank lines and comment-only lines left out."""
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        pending = ""
        for line in block.splitlines():
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending and not pending.startswith("#"):
                commands.append(pending)
            pending = ""
    return commands


def test_readme_walkthrough_commands_are_found():
    commands = walkthrough_commands(README.read_text(encoding="utf-8"))
    assert commands[0] == ". .venv/bin/activate"
    assert commands[-1] == "sopflow server stop"
    assert any(c.startswith("sopflow start dose_receipt") and "patient_id=" in c for c in commands)
    assert all("…" not in c or _VARIABLE.match(c) for c in commands), "an elided command cannot run as written"


def _environment(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SOPFLOW_", "PREFECT_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    env |= {
        "SOPFLOW_HOME": str(home),
        "SOPFLOW_PREFECT_PORT": str(free_port()),
        "SOPFLOW_PASSWORD": PASSWORD,
        "SOPFLOW_NEW_PASSWORD": PASSWORD,
        "PATH": f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    return env


def test_readme_walkthrough_runs_as_written(tmp_path):
    from flows.config import get_settings
    from flows.services import runs
    from flows.services.editor import sop_versions

    home, cwd = tmp_path / "home", tmp_path / "work"
    cwd.mkdir()
    for name in ("sops", "templates", ".venv"):  # where a checkout has them; `my/` and record.json land here
        (cwd / name).symlink_to(REPO / name)
    env = _environment(home)
    settings = dataclasses.replace(get_settings(), home=home, database_url=f"sqlite:///{home / 'sopflow.db'}")
    commands = walkthrough_commands(README.read_text(encoding="utf-8"))
    output = ""
    done: list[str] = []
    try:
        for command in commands:
            if m := _VARIABLE.match(command):
                ids = _ID.findall(output)
                assert ids, f"{command!r}: the command before it printed no id:\n{output}"
                env[m.group(1)] = ids[0]
                continue
            if m := _SUBMIT.match(command):
                runs.wait_for_run(settings, env[m.group(1)], step=m.group(2), timeout=LIMIT)
            result = subprocess.run(
                [BASH, "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=LIMIT
            )
            output = result.stdout + result.stderr
            assert result.returncode == 0, (
                f"README walkthrough step {len(done) + 1} failed (exit {result.returncode}):\n  {command}\n{output}\n"
                f"after:\n  " + "\n  ".join(done)
            )
            done.append(command)
        receipt = runs.quality_record(settings, env["RUN"])
        assert receipt["run"]["status"] == "completed"
        arrival = next(s for s in receipt["steps"] if s["id"] == "arrival")
        assert arrival["data"]["logger_max_c"] == -170.5  # the correction is the current value
        assert (
            "audit verify: OK"
            in subprocess.run(
                [BASH, "-c", "sopflow audit verify"], cwd=cwd, env=env, capture_output=True, text=True, check=False
            ).stdout
        )
        states = {v["version"]: v["state"] for v in sop_versions(settings, "demo_hospital", "dose_receipt")}
        assert states[1] in ("effective", "superseded"), states  # superseded once the sweep made v2 effective
        assert states[2] in ("in_review", "approved", "issued", "effective"), states
        change = runs.quality_record(settings, env["CHANGE"])
        approval = next(s for s in change["steps"] if s["id"] == "qa_approval")
        assert approval["status"] in ("signed", "done"), approval  # QA's approval is recorded
    finally:
        subprocess.run([BASH, "-c", "sopflow server stop"], cwd=cwd, env=env, capture_output=True, check=False)
