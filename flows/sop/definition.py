"""Stage 1 of the data path: an SOP's YAML data -> a checked definition, with every problem in one pass.

pydantic lists every structural problem of a file at once, but it gives a definition only when
there are none, and the cross-checks of :mod:`flows.sop.check` (step ids, roles, ``verify.of``,
expressions...) need one. So when validation fails, :func:`partial_definition` validates the
top-level keys one by one, and the steps, params and deadlines item by item, and builds a
definition (unvalidated) from the parts that passed. A part that failed is replaced by a
stand-in (:class:`UnparsedStep`, :class:`UnparsedDeadline`, a bare ``FieldSpec``) that keeps its
place, so the other parts keep their indices (and their lines), a duplicated id is still found,
and expressions may still read a broken step without a second, misleading problem.

``flows.sop.load`` (files) and ``flows.sop.editing`` (editor text) both end here.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, cast, get_args

from pydantic import TypeAdapter, ValidationError

from flows.errors import Problem, SopDefinitionError
from flows.sop.check import check_sop
from flows.sop.model import DeadlineSpec, FieldSpec, FieldType, InstitutionSpec, SopDefinition, StepSpec
from flows.sop.source import LineMap, LoadedSop, UnparsedDeadline, UnparsedStep, problems_from

__all__ = ["check_definition", "partial_definition"]

_FIELD_TYPES = frozenset(get_args(FieldType))


def _text(raw: Any, key: str) -> str:
    value = raw.get(key) if isinstance(raw, Mapping) else None
    return value if isinstance(value, str) else ""


@functools.cache
def _adapter(name: str) -> TypeAdapter[Any]:
    info = SopDefinition.model_fields[name]
    annotation: Any = info.annotation
    return TypeAdapter(Annotated[(annotation, *info.metadata)] if info.metadata else annotation)


_STEP: TypeAdapter[Any] = TypeAdapter(StepSpec)
_DEFAULTS = {"schema_version": 1, "id": "", "title": "", "version": 1, "steps": ()}


def _step(raw: Any) -> Any:
    try:
        return _STEP.validate_python(raw)
    except ValidationError:
        repeated = isinstance(raw, Mapping) and "repeat" in raw
        return UnparsedStep(_text(raw, "id"), _text(raw, "kind"), repeated)


def _field(raw: Any) -> FieldSpec:
    try:
        return FieldSpec.model_validate(raw)
    except ValidationError:
        kind = _text(raw, "type")
        return FieldSpec.model_construct(type=cast(FieldType, kind if kind in _FIELD_TYPES else "text"))


def _deadline(raw: Any) -> Any:
    try:
        return DeadlineSpec.model_validate(raw)
    except ValidationError:
        return UnparsedDeadline(_text(raw, "id"))


def partial_definition(data: Mapping[str, Any]) -> SopDefinition:
    """A definition of the parts of ``data`` that validate, with stand-ins for the rest (see above).

    Only for cross-checking: it is built without validation and must never run.
    """
    values: dict[str, Any] = dict(_DEFAULTS)
    for name, info in SopDefinition.model_fields.items():
        raw = data.get(info.alias or name)
        if raw is None:
            continue
        if name == "steps":
            values[name] = tuple(_step(item) for item in raw) if isinstance(raw, list) else ()
        elif name == "deadlines":
            values[name] = tuple(_deadline(item) for item in raw) if isinstance(raw, list) else ()
        elif name == "params":
            values[name] = {str(k): _field(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
        else:
            try:
                values[name] = _adapter(name).validate_python(raw)
            except ValidationError:
                continue
    return SopDefinition.model_construct(**values)


def check_definition(
    data: Mapping[str, Any],
    *,
    file: str,
    path: Path,
    text: str,
    sha256: str,
    lines: LineMap,
    problems: list[Problem],
    institution: InstitutionSpec | None = None,
    templates_dir: Path | None = None,
) -> LoadedSop:
    """Validate ``data`` as an SOP and cross-check it; ``problems`` (found while reading) come first.

    Raises:
        SopDefinitionError: every problem, schema and cross-reference alike, at once.
    """
    found = list(problems)
    try:
        definition = SopDefinition.model_validate(data)
    except ValidationError as exc:
        found.extend(problems_from(exc, SopDefinition, file, lines))
        definition = partial_definition(data)
    loaded = LoadedSop(definition, path, text, sha256, lines)
    found.extend(check_sop(loaded, institution=institution, templates_dir=templates_dir))
    if found:
        unique = list(dict.fromkeys(found))
        raise SopDefinitionError(sorted(unique, key=lambda p: (p.line or 0, p.path)))
    return loaded
