"""`sopflow sop ...`: problems as file:line lines, exit codes, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.sop import app

TESTS = Path(__file__).parent
REPO = TESTS.parent
VALID_SOPS = TESTS / "sops" / "valid" / "sops"
VALID_TEMPLATES = TESTS / "sops" / "valid" / "templates"
DIRS = ["--sops-dir", str(VALID_SOPS), "--templates-dir", str(VALID_TEMPLATES)]


@pytest.fixture(name="runner")
def runner_fixture() -> CliRunner:
    return CliRunner()


@pytest.fixture(name="broken_sops")
def broken_sops_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "sops" / "test_hospital"
    shutil.copytree(VALID_SOPS / "test_hospital", folder)
    shutil.copy(TESTS / "sops" / "invalid" / "four_problems.yaml", folder)
    return tmp_path / "sops"


def test_cli_validate_ok_counts_files(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", *DIRS])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "3 files OK"


def test_cli_validate_broken_sop_prints_file_line_and_exits_1(runner: CliRunner, broken_sops: Path) -> None:
    result = runner.invoke(
        app,
        [
            "validate",
            "--sops-dir",
            str(broken_sops),
            "--templates-dir",
            str(VALID_TEMPLATES),
        ],
    )

    assert result.exit_code == 1
    lines = result.output.splitlines()
    problem_lines = [line for line in lines if "four_problems.yaml:" in line]
    assert [line.split("four_problems.yaml:")[1].split(":")[0] for line in problem_lines] == ["10", "13", "16", "20"]
    assert any(line.endswith("steps[1].titel: unknown key 'titel'. Did you mean 'title'?") for line in problem_lines)
    assert lines[-1] == "4 problems in 1 of 4 files"
    assert "Traceback" not in result.output


def test_cli_validate_given_paths(runner: CliRunner) -> None:
    case = TESTS / "sops" / "invalid" / "unknown_role.yaml"

    result = runner.invoke(
        app,
        [
            "validate",
            str(case),
            str(VALID_SOPS / "test_hospital" / "every_kind.yaml"),
            *DIRS,
        ],
    )

    assert result.exit_code == 1
    assert "unknown_role.yaml:14: steps[1].role: unknown role 'pharmacst'. Did you mean 'pharmacist'?" in result.output
    assert result.output.splitlines()[-1] == "1 problem in 1 of 2 files"


def test_cli_validate_in_subprocess_has_no_traceback(tmp_path: Path) -> None:
    script = "import sys; from flows.cli.sop import app; sys.argv[0] = 'sop'; app()"
    case = TESTS / "sops" / "invalid" / "yaml_syntax.yaml"

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "validate",
            str(case),
            "--templates-dir",
            str(VALID_TEMPLATES),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 1
    assert "tests/sops/invalid/yaml_syntax.yaml:10: invalid YAML:" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_schema_writes_json(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "sop.schema.json"

    result = runner.invoke(app, ["schema", "--output", str(out)])
    printed = runner.invoke(app, ["schema"])

    assert result.exit_code == 0
    schema = json.loads(out.read_text(encoding="utf-8"))
    assert schema["title"] == "sopflow SOP definition"
    assert json.loads(printed.output) == schema


def test_cli_schema_unknown_kind(runner: CliRunner) -> None:
    result = runner.invoke(app, ["schema", "--kind", "sopp"])

    assert result.exit_code == 1
    assert "unknown schema kind 'sopp'" in result.output


def test_cli_list_shows_version_and_hash(runner: CliRunner) -> None:
    result = runner.invoke(app, ["list", *DIRS])

    assert result.exit_code == 0, result.output
    assert "every_kind" in result.output
    assert "test_hospital" in result.output


def test_cli_list_broken_institution_exits_1(runner: CliRunner, broken_sops: Path) -> None:
    result = runner.invoke(
        app,
        [
            "list",
            "--sops-dir",
            str(broken_sops),
            "--templates-dir",
            str(VALID_TEMPLATES),
        ],
    )

    assert result.exit_code == 1
    assert "four_problems.yaml:13: steps[0].kind: unknown step kind 'recrod'" in result.output


def test_cli_show_describes_steps_fields_and_checks(runner: CliRunner) -> None:
    result = runner.invoke(app, ["show", "every_kind", *DIRS])

    assert result.exit_code == 0, result.output
    assert "every_kind v2: Every step kind once" in result.output
    assert "1. arrival [record] role cell_lab" in result.output
    assert "-200..40 °C" in result.output
    assert "expect: arrival.logger_max_c <= product.storage_max_c" in result.output
    assert "timeout: 4h, then escalate to quality_manager" in result.output


def test_cli_show_unknown_id_suggests(runner: CliRunner) -> None:
    result = runner.invoke(app, ["show", "every_knd", "--institution", "test_hospital", *DIRS])

    assert result.exit_code == 1
    assert result.output.strip() == "no SOP 'every_knd' in test_hospital. Did you mean 'every_kind'?"


def test_cli_validate_institution_file_inside_its_folder(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: inside the folder, the id was compared with the folder name '' of the relative path."""
    folder = tmp_path / "test_hospital"
    shutil.copytree(VALID_SOPS / "test_hospital", folder)
    monkeypatch.chdir(folder)

    result = runner.invoke(
        app, ["validate", "institution.yaml", "every_kind.yaml", "--templates-dir", str(VALID_TEMPLATES)]
    )

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "2 files OK"
