"""Stage 1 of the data path: check expressions (``expect:``) and notify ``message:`` templates.

Both are compiled at load time with Jinja's sandbox, and the names they read are checked by
walking the parsed AST against a :class:`Scope` (params, product, earlier human steps, run),
so a typo is a load error naming the SOP file and step. At run time the engine calls
:func:`evaluate_check` and :func:`render_message`; any failure raises :class:`ExpressionError`.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, Undefined, nodes
from jinja2.environment import TemplateExpression
from jinja2.parser import Parser

from flows.errors import did_you_mean
from flows.sop.sandbox import ExpressionError, Sandbox, budget, guard_tree

__all__ = [
    "MAX_SOURCE",
    "ExpressionError",
    "Scope",
    "check_expression",
    "check_message",
    "evaluate_check",
    "evaluate_value",
    "render_message",
]

MAX_SOURCE = 4000
"""Longest expression or message template, in characters (the library's longest is under 1,000)."""


class _Values(SimpleNamespace):
    """Run data for one name (``arrival``, ``params``...): read as ``arrival.logger_max_c``.

    A namespace, not a dict, so a field named ``items`` or ``keys`` is the value and not a dict
    method. ``_where`` (unreadable in the sandbox: it starts with '_') names it in errors.
    """

    def __init__(self, where: str, values: Mapping[str, Any]) -> None:
        super().__init__(**{str(k): _as_values(f"{where}.{k}", v) for k, v in values.items()})
        self._where = where


def _as_values(where: str, value: Any) -> Any:
    return _Values(where, value) if isinstance(value, Mapping) else value


class _Undefined(StrictUndefined):
    @property
    def _undefined_message(self) -> str:
        obj = self._undefined_obj
        if isinstance(obj, _Values) and self._undefined_hint is None:
            return f"{obj._where!r} has no value {self._undefined_name!r}"
        return str(super()._undefined_message)


# Messages are plain text for apprise, not HTML, so autoescape stays off here.
_ENV = Sandbox(undefined=_Undefined, autoescape=False)


@dataclass(frozen=True)
class Scope:
    """The names an expression may read, and the attributes of each.

    ``names`` maps a top-level name to its allowed attributes; ``unavailable`` maps names that
    exist but may not be read here (a later step, ``product`` without a product param) to why.
    """

    names: Mapping[str, frozenset[str]]
    unavailable: Mapping[str, str] = field(default_factory=dict)


def _parse_expression(source: str) -> nodes.Expr:
    parser = Parser(_ENV, source, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        token = parser.stream.current
        raise TemplateSyntaxError(f"unexpected {token.value!r} after the expression", token.lineno)
    return expr


def _compile_expression(source: str) -> Callable[..., Any]:
    """Like ``Environment.compile_expression``, with the tree bounded (``flows.sop.sandbox``)."""
    body = [nodes.Assign(nodes.Name("result", "store"), _parse_expression(source), lineno=1)]
    tree = guard_tree(nodes.Template(body, lineno=1), _ENV)
    return TemplateExpression(_ENV.from_string(tree), undefined_to_none=False)


def _compile_template(source: str) -> Any:
    return _ENV.from_string(guard_tree(_ENV.parse(source), _ENV))


def _too_long(source: str, what: str) -> list[str]:
    if len(source) <= MAX_SOURCE:
        return []
    return [f"the {what} is {len(source)} characters long; the limit is {MAX_SOURCE}"]


def _chains(node: nodes.Node) -> Iterator[tuple[str, str | None]]:
    """Yield (name, first attribute or None) for every name the node reads."""
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        base = node.node
        attr = node.attr if isinstance(node, nodes.Getattr) else _const_str(node.arg)
        if isinstance(base, nodes.Name) and base.ctx == "load":
            yield base.name, attr
            if isinstance(node, nodes.Getitem) and attr is None:
                yield from _chains(node.arg)
            return
    if isinstance(node, nodes.Name) and node.ctx == "load":
        yield node.name, None
        return
    for child in node.iter_child_nodes():
        yield from _chains(child)


def _const_str(node: nodes.Node) -> str | None:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else None


def _check_names(source: str, tree: nodes.Node, scope: Scope, local_names: set[str]) -> list[str]:
    at = f"in {source!r}"
    problems = [
        f"attribute {n.attr!r} is not allowed {at} (names starting with '_' are private)"
        for n in [tree, *tree.find_all(nodes.Getattr)]
        if isinstance(n, nodes.Getattr) and n.attr.startswith("_")
    ]
    seen: set[tuple[str, str | None]] = set()
    for name, attr in _chains(tree):
        if (name, attr) in seen or name in local_names or name in _ENV.globals:
            continue
        seen.add((name, attr))
        if name in scope.unavailable:
            problems.append(f"{name!r} {at} {scope.unavailable[name]}")
        elif name not in scope.names:
            problems.append(
                f"unknown name {name!r} {at}. {did_you_mean(name, sorted(scope.names), 'Available')}".rstrip()
            )
        elif attr is not None and attr not in scope.names[name]:
            problems.append(
                f"{name!r} has no {attr!r} {at}. {did_you_mean(attr, sorted(scope.names[name]), 'Available')}".rstrip()
            )
    return problems


def _error_text(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc).rstrip(".")


def check_expression(source: str, scope: Scope) -> list[str]:
    """Compile a check expression and check the names it reads; returns problem messages."""
    if _too_long(source, "expression"):
        return _too_long(source, "expression")
    try:
        tree = _parse_expression(source)
        _compiled_expression(source)  # cached: the editor re-checks the same text as people type
    except TemplateError as exc:
        return [f"invalid expression {source!r}: {_error_text(exc)}"]
    except (RecursionError, SyntaxError, MemoryError):
        return [f"invalid expression {source!r}: nested too deeply"]
    return _check_names(source, tree, scope, set())


def check_message(source: str, scope: Scope) -> list[str]:
    """Compile a message template and check the names it reads; returns problem messages."""
    if _too_long(source, "message template"):
        return _too_long(source, "message template")
    try:
        tree = _ENV.parse(source)
        _compiled_template(source)
    except TemplateError as exc:
        return [f"invalid template {source!r}: {_error_text(exc)}"]
    except (RecursionError, SyntaxError, MemoryError):
        return [f"invalid template {source!r}: nested too deeply"]
    local_names = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    return _check_names(source, tree, scope, local_names)


def _context(context: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _as_values(str(k), v) for k, v in context.items()}


_compiled_expression = functools.lru_cache(maxsize=512)(_compile_expression)
_compiled_template = functools.lru_cache(maxsize=512)(_compile_template)
_RUNTIME = (TypeError, ValueError, ArithmeticError, LookupError, AttributeError)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it nests too deeply (a macro or loop() calling itself?)"
    if isinstance(exc, ExpressionError | TemplateError):
        return _error_text(exc)
    return str(exc)


def evaluate_check(expr: str, context: Mapping[str, Any]) -> bool:
    """Evaluate a check expression against run data; True means the check passed.

    ``context`` is ``{"params": {...}, "product": {...} | None, "<step_id>": {...}, "run": {...}}``.

    Raises:
        ExpressionError: the expression cannot be compiled or evaluated, or is not true/false.
    """
    try:
        with budget():
            return bool(_compiled_expression(expr)(**_context(context)))
    except (TemplateError, RecursionError, *_RUNTIME) as exc:
        raise ExpressionError(f"check {expr!r} failed: {_failure(exc)}") from exc


def evaluate_value(expr: str, context: Mapping[str, Any], what: str = "expression") -> Any:
    """Evaluate an expression (``compute:``, ``within_min:``...) against run data; returns its value.

    Raises:
        ExpressionError: the expression cannot be evaluated, or its value is run data itself
        (a whole step's values), not a number, text, yes/no or none.
    """
    try:
        with budget():
            value = _compiled_expression(expr)(**_context(context))
        if isinstance(value, Undefined):
            str(value)  # raises the UndefinedError that says which value is missing
    except (TemplateError, RecursionError, *_RUNTIME) as exc:
        raise ExpressionError(f"{what} {expr!r} failed: {_failure(exc)}") from exc
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ExpressionError(f"{what} {expr!r} gives {type(value).__name__}, not a number, text or yes/no")
    return value


def render_message(template: str, context: Mapping[str, Any]) -> str:
    """Render a notify message template against run data.

    Raises:
        ExpressionError: the template cannot be compiled or reads a value that is not there.
    """
    try:
        with budget():
            return str(_compiled_template(template).render(**_context(context)))
    except (TemplateError, RecursionError, *_RUNTIME) as exc:
        raise ExpressionError(f"message {template!r} failed: {_failure(exc)}") from exc
