"""Edge of the data path: ``sopflow sop ...``, the commands for stage 1 (SOP definitions).

    sopflow sop validate [PATH...]          every problem as file:line: path: message; exit 1 if any
    sopflow sop schema [--output FILE]      JSON Schema of SOP files, for editors
    sopflow sop list [--institution INST]   institutions' SOPs with version and sha256
    sopflow sop show ID [--institution I]   one SOP, readable: params, steps, fields, checks

A Typer sub-app; ``flows.cli`` mounts it as ``sop``. Only this layer formats errors: the
library raises. Module-level imports stay light (no prefect; flows.sop is imported per command).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from flows.errors import Problem
    from flows.sop.catalog import Catalog
    from flows.sop.model import FieldSpec, SopDefinition

__all__ = ["app"]

app = typer.Typer(
    name="sop",
    help="Validate, list and show SOP definitions (sops/<institution>/*.yaml).",
    no_args_is_help=True,
    add_completion=False,
)

SopsDir = Annotated[
    Path | None,
    typer.Option(
        "--sops-dir",
        help="Folder of institution folders [default: $SOPFLOW_SOPS_DIR or sops/].",
    ),
]
TemplatesDir = Annotated[
    Path | None,
    typer.Option(
        "--templates-dir",
        help="Document templates [default: $SOPFLOW_TEMPLATES_DIR or templates/].",
    ),
]


def _console() -> Console:
    # soft_wrap: a `file:line: path: message` line must stay one line, whatever the terminal width.
    return Console(soft_wrap=True, highlight=False)


def _catalog(sops_dir: Path | None, templates_dir: Path | None) -> Catalog:
    from flows.sop.catalog import Catalog

    return Catalog(sops_dir, templates_dir)


def _print_problems(console: Console, problems: list[Problem]) -> None:
    for problem in problems:
        console.print(Text(str(problem), style="red"))


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(Text(message, style="red"))
    return typer.Exit(code=1)


@app.command("validate")
def validate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Files or folders [default: the whole sops folder]."),
    ] = None,
    sops_dir: SopsDir = None,
    templates_dir: TemplatesDir = None,
) -> None:
    """Check SOP, institution and product files; print every problem as file:line: path: message."""
    console = _console()
    catalog = _catalog(sops_dir, templates_dir)
    targets = list(paths) if paths else [catalog.sops_dir]
    files = list(dict.fromkeys(f.resolve() for target in targets for f in catalog.files(target)))
    problems = list(dict.fromkeys(p for target in targets for p in catalog.validate(target)))
    _print_problems(console, problems)
    if problems:
        bad = len({p.file for p in problems})
        noun = "problem" if len(problems) == 1 else "problems"
        raise _fail(console, f"{len(problems)} {noun} in {bad} of {max(len(files), bad)} files")
    console.print(Text(f"{len(files)} files OK", style="green"))


@app.command("schema")
def schema(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to FILE instead of stdout."),
    ] = None,
    kind: Annotated[str, typer.Option("--kind", help="sop, institution or products.")] = "sop",
) -> None:
    """Print (or write) the JSON Schema editors use to complete sops/*/*.yaml."""
    from flows.sop.schema import SCHEMA_KINDS

    if kind not in SCHEMA_KINDS:
        raise _fail(
            _console(),
            f"unknown schema kind {kind!r}; choose one of {', '.join(SCHEMA_KINDS)}",
        )
    text = json.dumps(SCHEMA_KINDS[kind](), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    _console().print(f"wrote {output}")


@app.command("list")
def list_sops(
    institution: Annotated[str | None, typer.Option("--institution", "-i", help="Only this institution.")] = None,
    sops_dir: SopsDir = None,
    templates_dir: TemplatesDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")] = False,
) -> None:
    """List SOPs: institution, id, version, title and the start of the file's sha256."""
    from flows.errors import SopDefinitionError, SopNotFoundError

    console = _console()
    catalog = _catalog(sops_dir, templates_dir)
    table = Table("institution", "id", "version", "title", "sha256")
    rows: list[dict[str, object]] = []
    failed = False
    found = [institution] if institution else catalog.institutions()
    if not found:
        raise _fail(console, f"no institution folders under {catalog.sops_dir}: `sopflow init DIR` scaffolds one")
    for inst_id in found:
        try:
            inst = catalog.institution(inst_id)
        except SopNotFoundError as exc:
            raise _fail(console, str(exc)) from None
        except SopDefinitionError as exc:
            _print_problems(console, exc.problems)
            failed = True
            continue
        for sop in inst.sops.values():
            d = sop.definition
            table.add_row(inst_id, d.id, str(d.version), d.title, sop.sha256[:12])
            rows.append(
                {"institution": inst_id, "id": d.id, "version": d.version, "title": d.title, "sha256": sop.sha256}
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    elif table.row_count:
        console.print(table)
    if failed:
        raise _fail(console, "some institutions have invalid files; run `sopflow sop validate`")


def _field_line(name: str, spec: FieldSpec) -> str:
    rules: list[str] = []
    if spec.min is not None or spec.max is not None:
        low = "" if spec.min is None else f"{spec.min:g}"
        high = "" if spec.max is None else f"{spec.max:g}"
        rules.append(f"{low}..{high}{' ' + spec.unit if spec.unit else ''}")
    elif spec.unit:
        rules.append(spec.unit)
    if spec.choices:
        rules.append(" | ".join(spec.choices))
    if spec.pattern:
        rules.append(f"pattern {spec.pattern}")
    if spec.max_length:
        rules.append(f"max {spec.max_length} chars")
    if not spec.required:
        rules.append("optional")
    if spec.phi:
        rules.append("PHI")
    if spec.format:
        rules.append(f"format {spec.format}")
    if spec.compute:
        rules.append(f"computed: {spec.compute}")
    label = f"  {spec.label}" if spec.label else ""
    return f"{name:<18} {spec.type:<9} {', '.join(rules)}{label}".rstrip()


def _describe(defn: SopDefinition) -> list[str]:
    from flows.sop.model import (
        CheckStepSpec,
        DocumentStepSpec,
        HumanStepSpec,
        NotifyStepSpec,
        VerifyStepSpec,
        format_duration,
    )

    lines = ["Params:"] + [f"  {_field_line(n, s)}" for n, s in defn.params.items()] + ["", "Steps:"]
    for number, step in enumerate(defn.steps, start=1):
        head = f"  {number}. {step.id} [{step.kind}]"
        if isinstance(step, HumanStepSpec):
            head += f" role {step.role}"
        lines.append(head + (f" — {step.title}" if step.title else ""))
        if step.when:
            lines.append(f"       when: {step.when}")
        repeat = getattr(step, "repeat", None)
        if repeat is not None:
            until = f", until {repeat.until}" if repeat.until else ""
            lines.append(f"       repeat: every {format_duration(repeat.every)}, at most {repeat.times} times{until}")
        if isinstance(step, VerifyStepSpec):
            lines.append(f"       verifies: {step.of}")
        if isinstance(step, HumanStepSpec):
            if step.meaning:
                lines.append(f"       meaning: {step.meaning}")
            if step.timeout is not None:
                lines.append(
                    f"       timeout: {format_duration(step.timeout)}, then escalate to {step.escalate_to or 'nobody'}"
                )
            lines.extend(f"       {_field_line(n, s)}" for n, s in step.fields.items())
        elif isinstance(step, CheckStepSpec):
            lines.append(f"       expect: {step.expect}")
            lines.append(
                f"       on fail: {step.on_fail} ({step.deviation.classification}, "
                f"disposition by {step.deviation.disposition_role})"
            )
        elif isinstance(step, DocumentStepSpec):
            lines.append(f"       template: {step.template}")
        elif isinstance(step, NotifyStepSpec):
            lines.append(f"       to: {', '.join(step.to)}: {step.message}")
    if defn.distinct_signers:
        lines += ["", "Signed by different people:"]
        lines += [f"  {' / '.join(group)}" for group in defn.distinct_signers]
    if defn.deadlines:
        lines += ["", "Deadlines:"]
        for d in defn.deadlines:
            limit = format_duration(d.within) if d.within is not None else f"{d.within_min} min"
            lines.append(
                f"  {d.id}: {d.from_} → {d.to} within {limit}; "
                f"breach opens a {d.deviation.classification} deviation" + (f" — {d.title}" if d.title else "")
            )
    return lines


@app.command("show")
def show(
    sop_id: Annotated[
        str,
        typer.Argument(metavar="ID", help="The SOP id (its file name without .yaml)."),
    ],
    institution: Annotated[
        str | None,
        typer.Option("--institution", "-i", help="Institution id [default: the only one]."),
    ] = None,
    sops_dir: SopsDir = None,
    templates_dir: TemplatesDir = None,
) -> None:
    """Show one SOP: params, steps with kind and role, fields with units and limits, checks."""
    from flows.errors import SopDefinitionError, SopNotFoundError
    from flows.sop.load import display_path

    console = _console()
    catalog = _catalog(sops_dir, templates_dir)
    if institution is None:
        known = catalog.institutions()
        if len(known) != 1:
            raise _fail(
                console,
                f"say which institution with --institution (one of: {', '.join(known) or 'none'})",
            )
        institution = known[0]
    try:
        sop = catalog.get_sop(institution, sop_id)
    except SopNotFoundError as exc:
        raise _fail(console, str(exc)) from None
    except SopDefinitionError as exc:
        _print_problems(console, exc.problems)
        raise typer.Exit(code=1) from None
    d = sop.definition
    console.print(Text(f"{d.id} v{d.version}: {d.title}", style="bold"))
    console.print(f"{display_path(sop.path)}  sha256 {sop.sha256}", markup=False)
    if d.description:
        console.print(d.description, markup=False)
    console.print()
    for line in _describe(d):
        console.print(line, markup=False)
