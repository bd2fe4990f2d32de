"""Stage 1 of the data path: YAML text -> plain data with the line of every node, and pydantic
errors -> :class:`~flows.errors.Problem` ``(file, line, "steps[3].role", message)``.

``flows.sop.load`` (files) and ``flows.sop.editing`` (text in an editor) both read YAML here, so
a file and a draft get the same messages; ``flows.sop.check`` reports cross-reference problems
against the :class:`LoadedSop` and :class:`LineMap` defined here.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from flows.errors import Problem, did_you_mean
from flows.sop.model import ID_PATTERN, STEP_KINDS, SopDefinition
from flows.sop.safe_yaml import FAST, MAX_DEPTH, BoundedLoader, YamlRefused, check_expansion, precheck

__all__ = [
    "LineMap",
    "LoadedSop",
    "Loc",
    "UnparsedDeadline",
    "UnparsedStep",
    "display_path",
    "dotted",
    "parse_yaml",
    "problems_from",
]

Loc = tuple[str | int, ...]


def dotted(loc: Loc) -> str:
    """``('steps', 3, 'fields', 'x')`` -> ``'steps[3].fields.x'``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def display_path(path: Path) -> str:
    """The path as people should see it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class LineMap:
    """Line (1-based) of each YAML node, by path; a missing path falls back to its parent's line."""

    def __init__(self, lines: Mapping[Loc, int] | None = None) -> None:
        self._lines: dict[Loc, int] = dict(lines or {})

    def line(self, *loc: str | int) -> int | None:
        for end in range(len(loc), -1, -1):
            found = self._lines.get(tuple(loc[:end]))
            if found is not None:
                return found
        return None


@dataclass(frozen=True)
class LoadedSop:
    """One SOP file as loaded: the definition, and exactly which bytes it came from."""

    definition: SopDefinition
    path: Path
    text: str
    sha256: str
    lines: LineMap = field(default_factory=LineMap, repr=False, compare=False)
    """Where each key sits in ``text``; lets later checks report ``file:line``."""


@dataclass(frozen=True)
class UnparsedStep:
    """Stands in for a step that failed validation (its own problems are reported already):
    cross-checks skip it, and expressions may read any value of it (``flows.sop.definition``)."""

    id: str
    kind: str
    repeated: bool = False
    when: None = None
    title: None = None


@dataclass(frozen=True)
class UnparsedDeadline:
    """Stands in for a deadline that failed validation."""

    id: str


# --- YAML with line marks ---------------------------------------------------------------


def _walk(
    node: yaml.Node,
    loc: Loc,
    lines: dict[Loc, int],
    problems: list[tuple[Loc, int, str]],
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    (
                        (*loc, key),
                        line,
                        f"duplicate key {key!r} (first at line {seen[key]})",
                    )
                )
                continue
            seen[key] = line
            lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*loc, index)] = item.start_mark.line + 1
            _walk(item, (*loc, index), lines, problems)


def parse_yaml(text: str, file: str) -> tuple[Any, LineMap, list[Problem]]:
    """YAML text -> (data, line map, problems). Data is None when the YAML cannot be read.

    Reads within the bounds of :mod:`flows.sop.safe_yaml` (size, characters, tags, aliases, depth,
    numbers), so any text ends in data or problems with a line, in well under a second.
    """
    refused = precheck(text)
    if refused is not None:
        return None, LineMap(), [Problem(file, refused[0], "", refused[1])]
    try:
        loader = BoundedLoader(text)
    except yaml.reader.ReaderError as exc:  # an unprintable character, found when the reader opens
        return None, LineMap(), [Problem(file, _reader_line(text, exc), "", f"invalid YAML: {_reader_problem(exc)}")]
    try:
        node = loader.get_single_node()
        if node is None:
            return (
                None,
                LineMap(),
                [Problem(file, 1, "", "the file is empty; expected a YAML mapping")],
            )
        check_expansion(node)
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        dupes: list[tuple[Loc, int, str]] = []
        _walk(node, (), lines, dupes)
        data = loader.construct_document(node)
    except YamlRefused as exc:
        mark = exc.problem_mark
        return None, LineMap(), [Problem(file, mark.line + 1 if mark else None, "", str(exc.problem))]
    except yaml.reader.ReaderError as exc:
        return None, LineMap(), [Problem(file, _reader_line(text, exc), "", f"invalid YAML: {_reader_problem(exc)}")]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        if "maximum nesting depth" in str(exc.problem):  # libyaml's own limit, met while scanning ahead
            return None, LineMap(), [Problem(file, line, "", f"nested more than {MAX_DEPTH} levels deep")]
        what = " ".join(str(s) for s in (exc.context, exc.problem) if s)
        return None, LineMap(), [Problem(file, line, "", f"invalid YAML: {what}")]
    except yaml.YAMLError as exc:
        return None, LineMap(), [Problem(file, None, "", f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    problems = [Problem(file, line, dotted(loc), msg) for loc, line, msg in dupes]
    if not isinstance(data, dict):
        problems.append(
            Problem(
                file,
                1,
                "",
                f"expected a YAML mapping at the top, got {_type_name(data)}",
            )
        )
        return None, LineMap(lines), problems
    return data, LineMap(lines), problems


def _reader_line(text: str, exc: yaml.reader.ReaderError) -> int:
    position = max(exc.position, 0)
    if FAST:  # libyaml counts bytes of the UTF-8 text
        return text.encode("utf-8")[:position].count(b"\n") + 1
    return text.count("\n", 0, position) + 1


def _reader_problem(exc: yaml.reader.ReaderError) -> str:
    char = exc.character
    code = f"U+{ord(char) if isinstance(char, str) else char:04X}"
    return f"the character {code} is not allowed in YAML (control characters other than tab and newline)"


# --- pydantic errors -> Problems --------------------------------------------------------

_TYPE_NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "mapping",
    list: "list",
    type(None): "null",
}
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
    "timedelta_type": "a duration like '30m', '4h' or '2d'",
    "timedelta_parsing": "a duration like '30m', '4h' or '2d'",
}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tag_of(model: Any) -> str | None:
    kind = getattr(model, "model_fields", {}).get("kind")
    args = typing.get_args(kind.annotation) if kind is not None else ()
    return str(args[0]) if args else None


def _resolve(root: type[BaseModel], loc: Loc) -> tuple[Loc, Any]:
    """Walk the model types along a pydantic ``loc``: (loc without union tags, type found there)."""
    tp: Any = root
    clean: list[str | int] = []
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            members = {_tag_of(m): m for m in typing.get_args(_unwrap(tp))}
            if part in members:  # the tag pydantic inserts for a discriminated union
                tp = members[part]
                continue
            tp = None
        elif _is_model(tp):
            info = tp.model_fields.get(part)
            tp = info.annotation if info is not None else None
        elif origin in (dict, Mapping):
            tp = typing.get_args(tp)[1] if part != "[key]" else str
        elif origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        else:
            tp = None
        clean.append(part)
    return tuple(clean), _unwrap(tp)


def _message(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[Loc, str]:
    """(path without union tags, message) for one pydantic error."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    raw = tuple(err["loc"])
    loc, _ = _resolve(root, raw)
    if kind == "extra_forbidden":
        _, parent = _resolve(root, raw[:-1])
        names = [f.alias or n for n, f in parent.model_fields.items()] if _is_model(parent) else []
        return (
            loc,
            f"unknown key {loc[-1]!r}. {did_you_mean(str(loc[-1]), names)}".rstrip(),
        )
    if kind == "missing":
        return loc, f"missing required key {loc[-1]!r}"
    if kind == "union_tag_invalid":
        kinds = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        return (
            (*loc, "kind"),
            f"unknown step kind {ctx.get('tag')!r}. {did_you_mean(str(ctx.get('tag')), kinds)}",
        )
    if kind == "union_tag_not_found":
        if not isinstance(value, dict):
            return loc, f"expected a mapping, got {_type_name(value)} {_show(value)}"
        return (
            loc,
            f"missing required key 'kind' (one of {', '.join(STEP_KINDS)})",
        )
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == ID_PATTERN:
        what = "key" if loc and loc[-1] == "[key]" else "id"
        return loc[:-1] if what == "key" else loc, (
            f"{_show(value)} is not a valid {what}: use lower-case letters, digits and '_', starting with a letter"
        )
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",") if o.strip()]
        hint = did_you_mean(str(value), options) if isinstance(value, str) else ""
        return loc, f"expected {expected}, got {_show(value)}. {hint}".rstrip()
    if kind in ("value_error", "assertion_error"):
        return loc, str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in _EXPECTED:
        msg = f"expected {_EXPECTED[kind]}, got {_type_name(value)} {_show(value)}"
        if isinstance(value, bool) and kind == "string_type":
            msg += " (YAML reads yes/no/on/off/true/false as booleans; put the value in quotes)"
        return loc, msg
    msg = str(err["msg"])
    return loc, f"{msg[:1].lower()}{msg[1:]}, got {_show(value)}"


def problems_from(exc: ValidationError, root: type[BaseModel], file: str, lines: LineMap) -> list[Problem]:
    errors = exc.errors()
    problems = []
    for err in errors:
        if err["type"] == "too_short" and any(
            len(other["loc"]) > len(err["loc"]) and other["loc"][: len(err["loc"])] == err["loc"] for other in errors
        ):
            continue  # pydantic counts only the items that validated; the items' own errors say more
        loc, message = _message(err, root)
        line_loc = tuple(p for p in loc if p != "[key]")
        problems.append(Problem(file, lines.line(*line_loc), dotted(line_loc), message))
    return problems
