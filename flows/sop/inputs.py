"""Stage 1 of the data path: check run parameters and step fields against their FieldSpecs.

Values arrive as strings from the command line (``--set logger_max_c=-160``) or typed from
JSON (web form, API). :func:`coerce_values` turns them into JSON-serialisable Python values,
or raises :class:`~flows.errors.SopInputError` listing every problem. A field marked
``phi: true`` never has its value echoed in a message.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flows.errors import SopInputError, did_you_mean
from flows.sop.expressions import ExpressionError, evaluate_check, evaluate_value
from flows.sop.identifiers import normalize_din
from flows.sop.lookup import lookup_value
from flows.sop.model import FieldSpec, ProductSpec
from flows.sop.normalize import (
    DEFAULT_FUTURE_SKEW,
    BadValue,
    kind_of,
    normalize_datetime,
    normalize_number,
    normalize_text,
)

__all__ = ["coerce_values", "compute_fields"]

_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


_Bad = BadValue
"""One value is wrong; the message states the rule (and the value unless it is PHI)."""


def _num(value: float, unit: str | None) -> str:
    text = f"{value:g}"
    return f"{text} {unit}" if unit else text


def _number(spec: FieldSpec, value: Any, show: str) -> float:
    number = normalize_number(value, show)
    shown = _num(number, spec.unit) if not spec.phi else "the value"
    if spec.integer and not number.is_integer():
        raise _Bad(f"{shown} is not a whole number; this field takes whole numbers only")
    if spec.min is not None and number < spec.min:
        raise _Bad(f"{shown} is below the minimum {_num(spec.min, spec.unit)}")
    if spec.max is not None and number > spec.max:
        raise _Bad(f"{shown} is above the maximum {_num(spec.max, spec.unit)}")
    return number


def _bool(value: Any, show: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip(" ").lower() in _TRUE | _FALSE:
        return value.strip(" ").lower() in _TRUE
    raise _Bad(f"{show} is not a yes/no value; use true/false, yes/no or 1/0")


def _text(spec: FieldSpec, value: Any, show: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected text, got {kind_of(value)}")
    subject = "the value" if spec.phi else show
    text = normalize_text(
        value, multiline=spec.multiline, max_length=spec.max_length, pattern=spec.pattern, show=subject
    )
    if spec.format == "isbt128_din":
        text, problem = normalize_din(text)
        if problem:
            raise _Bad(f"{'the value' if spec.phi else repr(text)} {problem}")
    return text


def _coi(value: str, spec: FieldSpec, product: tuple[str, ProductSpec] | None) -> None:
    """A ``format: coi`` value against the run's product's ``coi_pattern``."""
    if product is None:
        raise _Bad("format 'coi' needs the run's product, and this run has none")
    name, entry = product
    if entry.coi_pattern is None:
        raise _Bad(
            f"product {name!r} has no 'coi_pattern' in the catalogue (products.yaml), so its "
            "chain-of-identity id cannot be checked; set 'coi_pattern' (and 'coi_example') for it"
        )
    if re.fullmatch(entry.coi_pattern, value) is None:
        subject = "the value" if spec.phi else repr(value)
        example = f" (e.g. {entry.coi_example!r})" if entry.coi_example else ""
        raise _Bad(
            f"{subject} is not a chain-of-identity id of product {name!r}: it must match {entry.coi_pattern!r}{example}"
        )


def _choice(spec: FieldSpec, value: Any, show: str) -> str:
    choices = list(spec.choices or ())
    if isinstance(value, str) and unicodedata.normalize("NFC", value.strip(" ")) in choices:
        return unicodedata.normalize("NFC", value.strip(" "))
    hint = did_you_mean(value if isinstance(value, str) and not spec.phi else "", choices)
    raise _Bad(f"{show} is not one of the choices. {hint}".rstrip())


def _product(value: Any, show: str, products: Mapping[str, ProductSpec]) -> str:
    if isinstance(value, str) and value in products:
        return value
    if not products:
        raise _Bad(f"{show} is not a known product; the institution's catalogue has no products")
    hint = did_you_mean(value if isinstance(value, str) else "", sorted(products))
    raise _Bad(f"{show} is not a product in the catalogue. {hint}".rstrip())


@dataclass(frozen=True)
class _Clock:
    """What a datetime is checked against: the clock, the run's start, the skew allowed."""

    now: datetime | None = None
    not_before: datetime | None = None
    future_skew: timedelta = DEFAULT_FUTURE_SKEW


def _coerce(spec: FieldSpec, value: Any, products: Mapping[str, ProductSpec], clock: _Clock = _Clock()) -> Any:
    show = "the value" if spec.phi else _shown(value)
    if spec.type == "number":
        return _number(spec, value, show)
    if spec.type == "bool":
        return _bool(value, show)
    if spec.type == "choice":
        return _choice(spec, value, show)
    if spec.type == "datetime":
        return normalize_datetime(
            value,
            show,
            now=clock.now if spec.future != "allowed" else None,
            not_before=clock.not_before,
            before_start_allowed=spec.before_start == "allowed",
            future_skew=clock.future_skew,
        )
    if spec.type == "product":
        return _product(value, show, products)
    return _text(spec, value, show)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def coerce_values(
    fields: Mapping[str, FieldSpec],
    raw: Mapping[str, Any],
    *,
    where: str,
    products: Mapping[str, ProductSpec] | None = None,
    product: tuple[str, ProductSpec] | None = None,
    now: datetime | None = None,
    not_before: datetime | None = None,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
) -> dict[str, Any]:
    """Check and convert run parameters or a step's fields; every declared field that is entered
    (not ``compute:``; :func:`compute_fields` adds those) is in the result.

    ``where`` names the SOP and the input in messages (``"dose_receipt step 'arrival'"``).
    Numbers become floats, datetimes ISO strings in UTC, optional fields left out become None.
    ``format: coi`` fields are checked against ``product`` (id, entry: the run's product), or,
    for run parameters, the product the ``product`` param names (looked up in ``products``).
    Every value goes through :mod:`flows.sop.normalize` (NFC text without control characters,
    one number rule). With ``now`` (aware), a datetime more than ``future_skew`` ahead of it is
    refused; with ``not_before`` (the run's start), one before it, unless the field says
    ``before_start: allowed``.

    Raises:
        SopInputError: every problem, at once (values of ``phi`` fields never appear).
    """
    problems: list[str] = []
    clock = _Clock(now, not_before, future_skew)
    for key in raw:
        if key in fields and fields[key].compute is not None:
            problems.append(f"{where}: {key}: is computed ({fields[key].compute!r}); it cannot be entered")
        elif key not in fields:
            hint = did_you_mean(str(key)[:100], list(fields))
            problems.append(f"{where}: unknown field {_shown(key)}. {hint}".rstrip())
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        if spec.compute is not None:
            continue  # compute_fields fills it in
        value = raw.get(name)
        if _is_empty(value):
            if spec.required:
                label = f" ({spec.label})" if spec.label else ""
                problems.append(f"{where}: {name}: a value is required{label}")
            values[name] = None
            continue
        try:
            values[name] = _coerce(spec, value, products or {}, clock)
        except _Bad as exc:
            problems.append(f"{where}: {name}: {exc}")
    run_product = product or _param_product(fields, values, products or {})
    # A product param that was given but refused is reported already; its coi is not checked against nothing.
    product_refused = run_product is None and any(
        f.type == "product" and not _is_empty(raw.get(n)) for n, f in fields.items()
    )
    for name, spec in fields.items():
        if spec.format == "coi" and isinstance(values.get(name), str) and not product_refused:
            try:
                _coi(values[name], spec, run_product)
            except _Bad as exc:
                problems.append(f"{where}: {name}: {exc}")
    if problems:
        raise SopInputError(problems)
    return values


def _param_product(
    fields: Mapping[str, FieldSpec], values: Mapping[str, Any], products: Mapping[str, ProductSpec]
) -> tuple[str, ProductSpec] | None:
    for name, spec in fields.items():
        if spec.type == "product" and values.get(name) in products:
            return values[name], products[values[name]]
    return None


def compute_fields(
    fields: Mapping[str, FieldSpec],
    entered: Mapping[str, Any],
    *,
    step_id: str,
    context: Mapping[str, Any],
    where: str,
) -> dict[str, Any]:
    """The entered values plus every computed field (``compute:``), in declaration order; then
    every ``required_when:`` condition over them.

    Each expression reads ``context`` (params, product, run, earlier steps) and this step's
    values so far as ``<step_id>.<field>``; its value is checked like an entered one (a number's
    ``min``/``max``, a choice's ``choices``). A field with ``lookup:`` takes the value of the row
    whose range holds its ``compute:`` value (:mod:`flows.sop.lookup`).

    Raises:
        SopInputError: every field that could not be computed, whose value breaks its rule, or
        that its ``required_when`` requires and nobody entered.
    """
    data = dict(entered)
    problems: list[str] = []
    for name, spec in fields.items():
        if spec.compute is None:
            continue
        data[name] = None
        try:
            value = evaluate_value(spec.compute, {**context, step_id: data}, "compute")
            if spec.lookup is not None and value is not None:
                value = _looked_up(spec, value)
            if value is None or (isinstance(value, str) and not value.strip()):
                if spec.required:
                    raise _Bad(f"{spec.compute!r} gives no value")
                continue
            if spec.type == "text" and not isinstance(value, str):
                value = str(value)
            data[name] = _coerce(spec, value, {})
        except ExpressionError as exc:
            problems.append(f"{where}: {name}: could not be computed: {exc}")
        except _Bad as exc:
            problems.append(f"{where}: {name}: the computed value {exc}")
    for name, spec in fields.items():
        if spec.required_when is None or not _is_empty(data.get(name)):
            continue
        try:
            required = evaluate_check(spec.required_when, {**context, step_id: data})
        except ExpressionError as exc:
            problems.append(f"{where}: {name}: whether it is required could not be decided: {exc}")
            continue
        if required:
            label = f" ({spec.label})" if spec.label else ""
            problems.append(f"{where}: {name}: a value is required when {spec.required_when!r}{label}")
    if problems:
        raise SopInputError(problems)
    return data


def _looked_up(spec: FieldSpec, key: Any) -> Any:
    if isinstance(key, bool) or not isinstance(key, int | float):
        raise _Bad(f"chooses its row by {spec.compute!r}, which gives {kind_of(key)}, not a number")
    value = lookup_value(spec.lookup or (), float(key))
    if value is None:
        raise _Bad(f"has no row for {spec.compute!r} = {float(key):g}")
    return value
