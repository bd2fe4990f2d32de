"""The wheel works (issue 13): every distribution ``flows/`` imports directly is declared in
``pyproject.toml`` with a range the installed version lies in, and the built wheel carries the
built-in SOP library, the document templates, the web's pages and the change-control SOP.

``undeclared_imports`` is the rule (imports read with ``ast``, at module level and inside
functions; modules mapped to distributions with ``importlib.metadata.packages_distributions()``);
a planted import shows it catches one. The install of the wheel into a fresh virtual environment
and the demo from it run in ``scripts/smoke`` (a minute of pip on this machine).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
FLOWS = REPO / "flows"


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _top_level_imports(root: Path) -> dict[str, list[str]]:
    """Every top-level module imported under ``root`` (absolute imports), with where."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def undeclared_imports(root: Path, declared: dict[str, Requirement]) -> list[str]:
    """Each direct import of a third-party module whose distribution ``pyproject.toml`` does not declare."""
    dists = md.packages_distributions()
    problems = []
    for module, where in sorted(_top_level_imports(root).items()):
        if module in sys.stdlib_module_names or module in ("__future__", root.name):
            continue
        owners = {canonicalize_name(d) for d in dists.get(module, [])}
        if not owners:
            problems.append(f"{where[0]}: imports {module!r}, which no installed distribution provides")
        elif not owners & declared.keys():
            problems.append(
                f"{where[0]}: imports {module!r} from {', '.join(sorted(owners))}, not declared in pyproject.toml"
            )
    return problems


def test_packaging_every_direct_import_is_declared():
    assert undeclared_imports(FLOWS, _declared()) == []


def test_packaging_every_declared_range_holds_the_installed_version():
    outside = []
    for name, req in _declared().items():
        installed = md.version(name)
        if not req.specifier.contains(installed, prereleases=True):
            outside.append(f"{req}: {installed} is installed")
        if not str(req.specifier):
            outside.append(f"{req.name}: declared without a range")
    assert outside == []


def test_packaging_a_planted_undeclared_import_is_caught(tmp_path: Path):
    copy = tmp_path / "flows"
    shutil.copytree(FLOWS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "web" / "api.py" if (copy / "web" / "api.py").exists() else copy / "web" / "app.py"
    # Inside a function, as a lazy import would be: packaging is installed (by Prefect), not declared.
    target.write_text(target.read_text(encoding="utf-8") + "\n\ndef _planted():\n    import packaging.version\n")

    problems = undeclared_imports(copy, _declared())

    assert len(problems) == 1
    assert re.search(r"flows/web/\w+\.py:\d+: imports 'packaging' from packaging, not declared", problems[0])


@pytest.fixture(name="wheel", scope="module")
def wheel_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("sopflow-*.whl")
    return wheel


@pytest.mark.slow
def test_packaging_the_wheel_carries_the_library_templates_and_pages(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"flows/library/{p.relative_to(REPO)}" for p in (REPO / "sops").rglob("*.yaml")}
    expected |= {f"flows/library/{p.relative_to(REPO)}" for p in (REPO / "templates").rglob("*.j2")}
    expected |= {f"flows/{p.relative_to(FLOWS)}" for p in (FLOWS / "web" / "templates").glob("*.html")}
    expected |= {"flows/builtin/change_control.yaml", "flows/web/static/app.css"} & {
        f"flows/{p.relative_to(FLOWS)}" for p in FLOWS.rglob("*") if p.is_file()
    }
    migrations = {f"flows/{p.relative_to(FLOWS)}" for p in (FLOWS / "record" / "migrations").rglob("*") if p.is_file()}
    migrations = {m for m in migrations if "__pycache__" not in m}
    assert {
        "flows/record/migrations/versions/0001_release_cf31c97.py",
        "flows/record/migrations/README.md",
    } <= migrations
    expected |= migrations  # the schema's revisions: `sopflow db upgrade` on a host with only the wheel
    assert len(expected) > 30
    assert expected - names == set()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for dist in ("typer", "fastapi", "uvicorn", "starlette", "sqlalchemy", "pydantic", "httpx", "rich"):
        assert re.search(rf"^Requires-Dist: {dist}\b", metadata, re.MULTILINE | re.IGNORECASE), dist
