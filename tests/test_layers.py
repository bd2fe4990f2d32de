"""The layers run one way (issue 10): every import in ``flows/`` — at module level and inside
functions — points down the data path, the CLI and the web call only the service floor, and no
import circle exists, hidden in a function or not.

    flows.sop  ←  flows.record, flows.outputs  ←  flows.engine  ←  flows.services  ←  flows.cli, flows.web

``flows.errors`` and ``flows.config`` (stdlib only) sit below everything; ``flows.cli`` may import
``flows.web`` (``sopflow web`` serves it), never the other way. ``check_layers`` is the rule; the
last test plants a violation in a copy of the package and shows the rule catches it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

FLOWS = Path(__file__).resolve().parents[1] / "flows"

LEVELS = {"errors": 0, "config": 0, "sop": 1, "record": 2, "outputs": 2, "engine": 3, "services": 4, "cli": 5, "web": 5}
"""Each top-level part of the package and its floor; a module imports only from its floor or below."""
EDGES = {"flows.errors", "flows.config", "flows.sop", "flows.services"}
"""What ``flows.cli`` and ``flows.web`` may import besides themselves: the floor, and the pure
definitions and settings (rendering an SOP needs its model)."""
SIBLINGS = {("cli", "web"), ("config", "errors")}
"""Imports allowed between parts on the same floor (importer, imported): the CLI serves the web app;
settings raise ``ConfigError``."""


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, package: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) of every import of ``package`` in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(
                    (child.lineno, a.name, in_function) for a in child.names if a.name.split(".")[0] == package
                )
            elif (
                isinstance(child, ast.ImportFrom)
                and child.module
                and not child.level
                and child.module.split(".")[0] == package
            ):
                found.extend((child.lineno, f"{child.module}.{a.name}", in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def check_layers(root: Path) -> list[str]:
    """Every import of ``root`` (a copy of ``flows/``) that breaks the layer rules, and every import circle."""
    package = root.name
    modules = _modules(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for line, target_name, in_function in _imports(path, package):
            target = _resolve(target_name, modules)
            if target is None or target == module:
                continue
            graph[module].add(target)
            where = f"{path.relative_to(root.parent)}:{line}: {module} imports {target}"
            where += " (inside a function)" if in_function else ""
            src, dst = _part(module), _part(target)
            if src not in LEVELS or dst not in LEVELS:
                continue  # flows/__init__, __main__, flows.builtin data: outside the floors
            if LEVELS[dst] > LEVELS[src]:
                problems.append(f"{where}: {src} may not import the floor above it ({dst})")
            elif LEVELS[dst] == LEVELS[src] and src != dst and (src, dst) not in SIBLINGS:
                problems.append(f"{where}: {src} and {dst} are on the same floor; neither imports the other")
            elif (
                src in ("cli", "web")
                and dst not in ("cli", "web")
                and not any(target == e or target.startswith(e + ".") for e in EDGES)
            ):
                problems.append(
                    f"{where}: the CLI and the web call only the service floor ({', '.join(sorted(EDGES))})"
                )
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a circle to read."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append([*sorted(component), sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_layers_every_import_of_flows_points_down_and_no_circle_exists():
    problems = check_layers(FLOWS)
    assert problems == [], "\n".join(problems)


def test_layers_the_rule_reads_imports_inside_functions_too():
    found = _imports(FLOWS / "services" / "worker.py", "flows")
    inside = {in_function for _, _, in_function in found}
    assert inside == {True, False}


@pytest.mark.parametrize(
    ("file", "line", "expected"),
    [
        # The executor importing change control's sweep, hidden in a method (as it did before issue 10).
        (
            "engine/executor.py",
            "    def _planted(self) -> None:\n        from flows.services.sweeps import sweep  # noqa\n",
            "flows.engine.executor imports flows.services.sweeps (inside a function): engine may not import the floor above it (services)",
        ),
        # A page calling the record directly instead of the floor.
        (
            "web/pages.py",
            "from flows.record.query import run_record  # noqa\n",
            "the CLI and the web call only the service floor",
        ),
        # Two service modules importing each other (the old service <-> changes.control circle).
        (
            "services/guard.py",
            "from flows.services.accounts import add_user  # noqa\n",
            "import circle: flows.services.accounts -> flows.services.guard",
        ),
        # The record importing the engine.
        (
            "record/ledger.py",
            "from flows.engine.steps import write_step  # noqa\n",
            "record may not import the floor above it (engine)",
        ),
    ],
)
def test_layers_a_planted_violation_is_caught(tmp_path: Path, file: str, line: str, expected: str):
    copy = tmp_path / "flows"
    shutil.copytree(FLOWS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    text = target.read_text(encoding="utf-8")
    if line.startswith("    "):  # a method: append it to the first class of the module
        head, sep, rest = text.partition("\nclass ")
        name_end = rest.index(":\n") + 2
        text = head + sep + rest[:name_end] + line + rest[name_end:]
    else:
        text += "\n" + line
    target.write_text(text, encoding="utf-8")

    problems = check_layers(copy)

    assert any(expected in p for p in problems), "\n".join(problems)
    assert check_layers(FLOWS) == []
