"""Stage 1 of the data path: the bounded Jinja sandbox that SOP expressions and messages run in.

Jinja's immutable sandbox stops an expression from reaching Python internals; it does not stop
one from running for minutes or building a gigabyte (``'%099999999d' % 1``, ``(10**100)**100``,
``lipsum(n=100000)``, ``'{:>999999999}'.format(1)``, nested loops, a recursive macro). Here every
evaluation runs within these bounds, and breaking one raises :class:`ExpressionError` at once:

    MAX_STRING    characters of any text built, and of a message's whole output    100,000
    MAX_ITEMS     items of a list built, numbers of a range(), loop iterations      10,000
    MAX_INT_BITS  bits of an integer built (about 1,200 digits)                     4,096
    MAX_WIDTH     a width or precision in %-formatting, str.format, center/ljust... 1,000
    MAX_CALLS     calls nested in each other (macros, loop(), functions)            20
    MAX_SECONDS   one evaluation, checked at every call, loop step and operator     0.5

How: operators ``* ** % +`` go through :meth:`_Sandbox.call_binop`; every call through
:meth:`_Sandbox.call` (widths, ``replace``/``join`` sizes, nesting, time); ``str.format`` through
:meth:`_Sandbox.wrap_str_format`; filters are wrapped (their result size, and the few that pad,
batch or join, before they run); ``range`` and ``lipsum`` are replaced; and the parsed tree is
rewritten (:class:`_Guard`) so that every loop counts its steps, every ``~`` and every piece of
output counts its characters. Filters a quality record has no use for and that are hard to bound
(``random``: not reproducible; ``wordwrap``, ``urlize``, ``pprint``, ``xmlattr``) are not offered.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from string import Formatter
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

__all__ = [
    "MAX_CALLS",
    "MAX_INT_BITS",
    "MAX_ITEMS",
    "MAX_SECONDS",
    "MAX_STRING",
    "MAX_WIDTH",
    "ExpressionError",
    "Sandbox",
    "budget",
    "guard_tree",
]

MAX_STRING = 100_000
MAX_ITEMS = 10_000
MAX_INT_BITS = 4096
MAX_WIDTH = 1000
MAX_CALLS = 20
MAX_SECONDS = 0.5
_MAX_EXPONENT = 100

_REMOVED_FILTERS = ("random", "wordwrap", "urlize", "pprint", "xmlattr")
_PADDING = frozenset({"center", "ljust", "rjust", "zfill"})
_UNSAFE_STR_METHODS = frozenset({"translate", "maketrans", "expandtabs"})
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")


class ExpressionError(ValueError):
    """A check expression or message template failed at run time (the engine fails the check)."""


@dataclass
class _Budget:
    deadline: float
    steps: int = 0
    output: int = 0
    depth: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tick(self) -> None:
        if time.perf_counter() > self.deadline:
            raise ExpressionError(f"it ran longer than {MAX_SECONDS:g} s, the limit for one evaluation")


_BUDGET: ContextVar[_Budget | None] = ContextVar("sopflow_expression_budget", default=None)


@contextlib.contextmanager
def budget() -> Iterator[None]:
    """One evaluation's allowance of time, loop steps, output and call depth (see the table above)."""
    token = _BUDGET.set(_Budget(time.perf_counter() + MAX_SECONDS))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _tick() -> _Budget | None:
    current = _BUDGET.get()
    if current is not None:
        current.tick()
    return current


# --- sizes ----------------------------------------------------------------------------


def _weight(value: Any, depth: int = 0) -> int:
    """About how many characters the value takes as text: what repeating or joining it costs."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple) and depth < 3:
        return len(value) + sum(_weight(v, depth + 1) for v in value[:MAX_ITEMS])
    if isinstance(value, list | tuple | dict):
        return len(value)
    return 1


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ExpressionError(f"{what} gives an integer of {value.bit_length()} bits; the limit is {MAX_INT_BITS}")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ExpressionError(f"{what} gives text of {len(value)} characters; the limit is {MAX_STRING}")
    if isinstance(value, list | tuple | dict) and len(value) > MAX_ITEMS:
        raise ExpressionError(f"{what} gives {len(value)} items; the limit is {MAX_ITEMS}")
    return value


def _check_widths(spec: str, what: str) -> None:
    """Every number in a format spec (a width, a precision) at most MAX_WIDTH."""
    for digits in _DIGITS.findall(spec):
        if len(digits) > 4 or int(digits) > MAX_WIDTH:
            raise ExpressionError(f"{what}: the width or precision {digits[:12]} is above the limit {MAX_WIDTH}")


def _check_percent(fmt: str, what: str) -> None:
    for match in _PERCENT.finditer(fmt):
        if "*" in match.group(0):
            raise ExpressionError(f"{what}: '*' widths are not allowed")
        _check_widths(match.group(0), what)


def _check_format(fmt: str, what: str) -> None:
    try:
        parts = list(Formatter().parse(fmt))
    except ValueError as exc:
        raise ExpressionError(f"{what}: {exc}") from exc
    for _, _, spec, _ in parts:
        if spec and "{" in spec:
            raise ExpressionError(f"{what}: nested '{{...}}' in a format spec is not allowed")
        _check_widths(spec or "", what)


# --- the environment ------------------------------------------------------------------


def _binop(operator_: str, left: Any, right: Any) -> Any:
    what = f"{operator_!r}"
    if operator_ == "**":
        if isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
            raise ExpressionError(f"exponent {right!r} is too large (the limit is {_MAX_EXPONENT})")
        if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise ExpressionError(f"{left.bit_length()}-bit ** {right} is above the limit of {MAX_INT_BITS} bits")
        return _check_size(operator.pow(left, right), what)
    if operator_ == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int) and _weight(seq) * times > MAX_STRING:
                raise ExpressionError(f"repeating a sequence {times} times is above the limit of {MAX_STRING}")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ExpressionError(f"the product would be above the limit of {MAX_INT_BITS} bits")
        return _check_size(operator.mul(left, right), what)
    if operator_ == "%":
        if isinstance(left, str):
            _check_percent(left, "'%' formatting")
        return _check_size(operator.mod(left, right), what)
    sequences = isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple)
    if sequences and _weight(left) + _weight(right) > MAX_STRING:
        raise ExpressionError(f"joining with '+' is above the limit of {MAX_STRING} characters")
    return _check_size(operator.add(left, right), what)


def _precheck_call(obj: Any, args: tuple[Any, ...]) -> None:
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in _PADDING and args and isinstance(args[0], int) and args[0] > MAX_WIDTH:
        raise ExpressionError(f"{name}({args[0]}) is above the width limit {MAX_WIDTH}")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = owner.count(args[0]) if args[0] else len(owner) + 1
        if len(owner) + count * len(args[1]) > MAX_STRING:
            raise ExpressionError(f"replace() would give more than {MAX_STRING} characters")
    if name == "join" and args:
        parts = list(args[0])[: MAX_ITEMS + 1]
        if len(parts) > MAX_ITEMS or _weight(parts) + len(owner) * len(parts) > MAX_STRING:
            raise ExpressionError(f"join() would give more than {MAX_STRING} characters")


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox within the bounds of this module."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.globals["range"] = _range
        self.globals["lipsum"] = _lipsum
        for name in _REMOVED_FILTERS:
            self.filters.pop(name, None)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["sopflow_loop"] = _loop
        self.filters["sopflow_concat"] = _concat
        self.filters["sopflow_out"] = _out

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        _tick()
        return _binop(operator_, left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _UNSAFE_STR_METHODS:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, "str.format")
            return str(_check_size(wrapped(*args, **kwargs), "str.format"))

        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        current = _tick()
        _precheck_call(__obj, args)
        if current is not None:
            if current.depth >= MAX_CALLS:
                raise ExpressionError(
                    f"calls are nested more than {MAX_CALLS} deep (a macro or loop() calling itself?)"
                )
            current.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            if current is not None:
                current.depth -= 1
        return _check_size(result, f"calling {getattr(__obj, '__name__', type(__obj).__name__)}()")


def _range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_ITEMS:
        raise ExpressionError(f"range() of {len(numbers)} numbers is above the limit of {MAX_ITEMS}")
    return numbers


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if n > 5 or max > 100 or min > max:
        raise ExpressionError("lipsum() gives at most 5 paragraphs of at most 100 words")
    return str(generate_lorem_ipsum(n=n, html=html, min=min, max=max))


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context, eval context or environment

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        values = list(args[skip:])
        if name in ("center", "indent", "truncate", "batch", "slice") and any(
            (isinstance(v, int) and v > MAX_WIDTH) or (isinstance(v, str) and len(v) > MAX_WIDTH)
            for v in [*values[1:], *kwargs.values()]
        ):
            raise ExpressionError(f"the filter {name!r}: a width or count above the limit {MAX_WIDTH}")
        if name == "format" and values and isinstance(values[0], str):
            _check_percent(values[0], "the filter 'format'")
        if name == "join" and values and not isinstance(values[0], str):
            parts = list(values[0])[: MAX_ITEMS + 1]
            separator = values[1] if len(values) > 1 else kwargs.get("d", "")
            if len(parts) > MAX_ITEMS or _weight(parts) + len(str(separator)) * len(parts) > MAX_STRING:
                raise ExpressionError(f"the filter 'join' would give more than {MAX_STRING} characters")
            args = (*args[:skip], parts, *values[1:])
        if name == "replace" and len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
            text, old, new = values[:3]
            count = text.count(old) if old else len(text) + 1
            if len(text) + count * len(new) > MAX_STRING:
                raise ExpressionError(f"the filter 'replace' would give more than {MAX_STRING} characters")
        result = func(*args, **kwargs)
        if isinstance(result, Iterator):
            return _counted(result, name)
        return _check_size(result, f"the filter {name!r}")

    return bounded


def _counted(items: Iterator[Any], what: str) -> Iterator[Any]:
    for n, item in enumerate(items, start=1):
        if n > MAX_ITEMS:
            raise ExpressionError(f"the filter {what!r} gives more than {MAX_ITEMS} items")
        yield item


@pass_context
def _loop(context: Any, iterable: Any) -> Iterator[Any]:
    current = _BUDGET.get()
    for item in iterable:
        if current is not None:
            current.steps += 1
            if current.steps > MAX_ITEMS:
                raise ExpressionError(f"loops ran more than {MAX_ITEMS} steps in one evaluation")
            current.tick()
        yield item


def _concat(parts: list[Any]) -> str:
    texts = [str(p) for p in parts]
    if sum(len(t) for t in texts) > MAX_STRING:
        raise ExpressionError(f"'~' would give more than {MAX_STRING} characters")
    return "".join(texts)


@pass_context
def _out(context: Any, value: Any) -> str:
    text = str(value)
    current = _BUDGET.get()
    if current is not None:
        current.output += len(text)
        if current.output > MAX_STRING:
            raise ExpressionError(f"the output is longer than {MAX_STRING} characters")
    return text


class _Guard(NodeTransformer):
    """Rewrites a parsed template so loops, ``~`` and output pass through the bounded filters."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "sopflow_loop", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes), "sopflow_concat", [], [], None, None, lineno=node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            nodes.Filter(
                nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else child,
                "sopflow_out",
                [],
                [],
                None,
                None,
                lineno=child.lineno,
            )
            for child in node.nodes
        ]
        return node


def guard_tree(tree: nodes.Template, environment: Sandbox) -> nodes.Template:
    """The tree with every loop, ``~`` and output bounded (see :class:`_Guard`)."""
    guarded = _Guard().visit(tree)
    guarded.set_environment(environment)
    return guarded  # type: ignore[no-any-return]
