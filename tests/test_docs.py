"""README.md documents every step kind, error class, CLI command and setting."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows import errors
from flows.sop.model import STEP_KINDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", sorted(STEP_KINDS))
def test_readme_documents_step_kind(kind):
    assert re.search(rf"^\| `{kind}` \|", README, re.MULTILINE), f"README.md has no row for step kind {kind!r}"


@pytest.mark.parametrize(
    "name", sorted(n for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.FlowsError))
)
def test_readme_documents_error_class(name):
    assert f"`{name}`" in README


def _commands() -> list[str]:
    from typer.main import get_command

    from flows.cli import app

    root = get_command(app)
    out = []
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        out += [f"sopflow {name} {s}" for s in subs] if subs else [f"sopflow {name}"]
    return sorted(out)


@pytest.mark.parametrize("command", _commands())
def test_readme_documents_cli_command(command):
    assert f"`{command}`" in README


def test_readme_documents_every_setting():
    names = set(
        re.findall(r"SOPFLOW_[A-Z_]+", (Path(__file__).resolve().parents[1] / "flows" / "config.py").read_text())
    )
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"settings missing from README.md: {missing}"


def _loaded(modules: str, names: set[str]) -> list[str]:
    """Which of ``names`` (top-level packages, or ``flows.<package>``) a fresh interpreter has loaded
    after importing ``modules``."""
    code = (
        f"import sys, {modules}; "
        "print(*sorted({m.split('.')[0] if not m.startswith('flows.') else '.'.join(m.split('.')[:2]) "
        f"for m in sys.modules}} & set({sorted(names)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_cli_startup_imports_neither_prefect_nor_weasyprint():
    floor = ", ".join(
        f"flows.services.{m.stem}"
        for m in (Path(__file__).resolve().parents[1] / "flows" / "services").glob("[a-z]*.py")
    )
    assert _loaded(f"flows.cli, {floor}", {"prefect", "weasyprint", "apprise"}) == []


def test_audit_verify_does_not_load_the_sop_language():
    """`audit verify` walks stored rows and never parses an SOP: the record's modules import
    ``flows.sop`` (with YAML and Jinja) only where a pinned revision is parsed. Checked: with
    ``flows.record.pinned`` importing it at the top again, this fails naming flows.sop, jinja2, yaml."""
    assert _loaded("flows.services.audit", {"flows.sop", "yaml", "jinja2", "prefect"}) == []


def test_readme_documents_every_field_key():
    """Issue 15: the SOP language grew (multiline, integer, before_start, required_when, lookup)."""
    from flows.sop.model import FieldSpec, LookupRowSpec

    keys = [f.alias or n for n, f in FieldSpec.model_fields.items()]
    keys += [f.alias or n for n, f in LookupRowSpec.model_fields.items()]
    missing = sorted(k for k in keys if f"`{k}`" not in README and f"`{k}:" not in README)
    assert not missing, f"field keys missing from README.md: {missing}"
