"""Stage 1 of the data path: lookup tables, values chosen by the range a measured value falls in.

A computed field may carry ``lookup:`` rows; its ``compute:`` then names the number field it
chooses by (``ld_record.weight_kg``), and its value is the ``value`` of the row whose range holds
that field's value::

    mg_per_kg:
      type: number
      compute: ld_record.weight_kg
      lookup:
        - {from: 1, below: 30, value: 12}    # 12 mg/kg under 30 kg
        - {from: 30, to: 300, value: 8}      # 8 mg/kg from 30 kg

When the SOP loads, :func:`lookup_problems` checks that the field it chooses by is a number field
with ``min`` and ``max``, that the rows are in ascending order, neither overlap nor leave a gap
(for an ``integer: true`` key, a gap no whole number falls in is none: ``{to: 2}`` then
``{from: 3}``), and cover that field's whole range, and that every value is one this field may hold. So every
value that can be entered finds exactly one row; :func:`lookup_value` finds it at submit time.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flows.sop.fields import FieldSpec, LookupRowSpec

__all__ = ["KEY_PATTERN", "key_fields", "lookup_problems", "lookup_value"]

KEY_PATTERN = re.compile(r"([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)")
"""What ``compute:`` of a lookup field must be: ``<step>.<field>`` or ``params.<name>``."""

Loc = tuple[str | int, ...]


def lookup_value(rows: Sequence[LookupRowSpec], key: float) -> float | str | None:
    """The value of the row whose range holds ``key``; None when no row does."""
    for row in rows:
        if row.holds(key):
            return row.value
    return None


def _end_key(row: LookupRowSpec, lower: bool) -> str:
    if lower:
        return "from" if row.from_ is not None else "above"
    return "to" if row.to is not None else "below"


def _uncovered_integer(end: float, inclusive: bool) -> float:
    """The first whole number after a row that ends at ``end``."""
    return math.floor(end) + 1 if inclusive or not end.is_integer() else end


def _between(rows: Sequence[LookupRowSpec], integer: bool) -> list[tuple[Loc, str]]:
    """Order, overlaps and gaps; for a whole-number key only whole numbers can fall in a gap."""
    problems: list[tuple[Loc, str]] = []
    for j in range(1, len(rows)):
        (low, low_in), (prev_high, prev_in) = rows[j].lower, rows[j - 1].upper
        loc: Loc = (j, _end_key(rows[j], True))
        if integer:
            first = _uncovered_integer(prev_high, prev_in)
            gap = first < low or (first == low and not low_in)
        else:
            gap = low > prev_high or (low == prev_high and not low_in and not prev_in)
        if low < rows[j - 1].lower[0]:
            problems.append((loc, f"rows must be in ascending order: this row starts at {low:g}, below the row before"))
        elif low < prev_high or (low == prev_high and low_in and prev_in):
            problems.append((loc, f"overlaps the row before, which ends at {prev_high:g}: a value would be in both"))
        elif gap and low > prev_high:
            problems.append((loc, f"leaves a gap: values between {prev_high:g} and {low:g} are in no row"))
        elif gap:
            problems.append(
                (loc, f"leaves {low:g} in no row: the row before ends below it and this row starts above it")
            )
    return problems


def _covers(rows: Sequence[LookupRowSpec], key: FieldSpec, ref: str) -> list[tuple[Loc, str]]:
    if key.min is None or key.max is None:
        return []
    problems: list[tuple[Loc, str]] = []
    (low, low_in), (high, high_in) = rows[0].lower, rows[-1].upper
    if low > key.min or (low == key.min and not low_in):
        problems.append(
            (
                (0, _end_key(rows[0], True)),
                f"the rows must cover {ref!r} from its minimum {key.min:g}; "
                f"they start {'at' if low_in else 'above'} {low:g}",
            )
        )
    if high < key.max or (high == key.max and not high_in):
        last = len(rows) - 1
        problems.append(
            (
                (last, _end_key(rows[-1], False)),
                f"the rows must cover {ref!r} up to its maximum {key.max:g}; "
                f"they end {'at' if high_in else 'below'} {high:g}",
            )
        )
    return problems


def _values(rows: Sequence[LookupRowSpec], spec: FieldSpec) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for j, row in enumerate(rows):
        value = row.value
        if spec.type == "number":
            if isinstance(value, str):
                problems.append(((j, "value"), f"{value!r} is text; this field is a number"))
            elif spec.min is not None and value < spec.min:
                problems.append(((j, "value"), f"{value:g} is below this field's minimum {spec.min:g}"))
            elif spec.max is not None and value > spec.max:
                problems.append(((j, "value"), f"{value:g} is above this field's maximum {spec.max:g}"))
        elif spec.type == "choice" and value not in (spec.choices or ()):
            problems.append(
                ((j, "value"), f"{value!r} is not one of this field's choices: {', '.join(spec.choices or ())}")
            )
    return problems


def lookup_problems(
    spec: FieldSpec, fields_by_ref: Mapping[str, FieldSpec | None]
) -> tuple[list[tuple[Loc, str]], list[str]]:
    """Problems of a field's ``lookup`` rows, as ``(loc under 'lookup', message)``, and problems of
    its ``compute`` key (messages). ``fields_by_ref`` gives the field a ``<step>.<field>`` names
    (None: that step could not be read; its own problems are reported)."""
    if spec.lookup is None or spec.compute is None:
        return [], []
    ref = spec.compute.strip()
    rows = spec.lookup
    key = fields_by_ref.get(ref)
    problems = _between(rows, key is not None and key.integer) + _values(rows, spec)
    if KEY_PATTERN.fullmatch(ref) is None:
        return problems, [
            f"{ref!r} is not a field: a 'lookup' chooses by a number field, named like 'ld_record.weight_kg'"
        ]
    if key is None:  # an unknown name or a later step: the expression check reports it
        return problems, []
    if key.type != "number":
        return problems, [f"{ref!r} is a {key.type} field; a 'lookup' chooses by a number field"]
    if key.min is None or key.max is None:
        return problems, [
            f"{ref!r} needs 'min' and 'max': the rows of a 'lookup' must cover the whole range of the field they choose by"
        ]
    return problems + _covers(rows, key, ref), []


def key_fields(steps: Sequence[Any], params: Mapping[str, FieldSpec], position: int) -> dict[str, FieldSpec | None]:
    """``<step>.<field>`` -> FieldSpec for the params and the human steps up to ``position`` (included)."""
    out: dict[str, FieldSpec | None] = {f"params.{n}": f for n, f in params.items()}
    for step in steps[: position + 1]:
        fields = getattr(step, "fields", None)
        if isinstance(fields, Mapping):  # a step that could not be read has none: its names are not checked
            out.update({f"{step.id}.{n}": f for n, f in fields.items()})
    return out
