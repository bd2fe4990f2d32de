"""Stage 1 of the data path: SOP YAML *text* (not a file) -> definition or problems, for editors.

``load_sop_text`` validates text exactly as ``load_sop`` validates a file (the same parser, the
same pydantic messages, the same cross-checks), so the web editor shows the same
``line: path: message`` problems as ``sopflow sop validate``. ``validate_sop_text`` returns
them as plain dicts for a page; ``schema_field_names`` gives the JSON Schema's key names, by
where they may appear, for completion.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from flows.errors import Problem, SopDefinitionError
from flows.sop.definition import check_definition
from flows.sop.model import InstitutionSpec
from flows.sop.schema import sop_json_schema
from flows.sop.source import LoadedSop, parse_yaml

__all__ = ["load_sop_text", "schema_field_names", "validate_sop_text"]


def load_sop_text(
    text: str,
    *,
    name: str,
    institution: InstitutionSpec | None = None,
    templates_dir: Path | None = None,
    sop_id: str | None = None,
) -> LoadedSop:
    """Load, validate and cross-check SOP YAML text shown as ``name`` in problems.

    ``sop_id``: the id the text must carry (a file's stem; for a draft of an existing SOP).

    Raises:
        SopDefinitionError: every problem in the text, at once.
    """
    data, lines, problems = parse_yaml(text, name)
    if data is None:
        raise SopDefinitionError(problems)
    if sop_id is not None and "id" in data and data["id"] != sop_id:
        problems.append(Problem(name, lines.line("id"), "id", f"id {data['id']!r} must equal {sop_id!r}"))
    return check_definition(
        data,
        file=name,
        path=Path(name),
        text=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        lines=lines,
        problems=problems,
        institution=institution,
        templates_dir=templates_dir,
    )


def validate_sop_text(
    text: str,
    *,
    name: str = "draft.yaml",
    institution: InstitutionSpec | None = None,
    templates_dir: Path | None = None,
    sop_id: str | None = None,
) -> list[dict[str, Any]]:
    """Every problem in SOP YAML text as ``{line, path, message, text}`` (``text`` is what the CLI
    prints: ``name:line: path: message``); an empty list when the text is a valid SOP."""
    try:
        load_sop_text(text, name=name, institution=institution, templates_dir=templates_dir, sop_id=sop_id)
    except SopDefinitionError as exc:
        return [{"line": p.line, "path": p.path, "message": p.message, "text": str(p)} for p in exc.problems]
    return []


def _props(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def schema_field_names() -> dict[str, list[str]]:
    """The SOP JSON Schema's key names by where they go: ``sop`` (top level), ``field`` (a param or
    a step's field), and one entry per step kind (``step.record``, ``step.check`` …)."""
    schema = sop_json_schema()
    out: dict[str, list[str]] = {"sop": sorted(schema["properties"])}
    defs = schema["$defs"]
    out["field"] = sorted(defs["FieldSpec"]["properties"])
    for name, node in defs.items():
        kind = node.get("properties", {}).get("kind", {})
        tag = kind.get("const") or (kind.get("enum") or [None])[0]
        if name.endswith("StepSpec") and tag:
            out[f"step.{tag}"] = sorted(_props(schema, node)["properties"])
    return out
