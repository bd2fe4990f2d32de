"""Stage 1 of the data path: what a typed field *is* (frozen pydantic models): a run parameter or a
value a person enters in a step, and the lookup table a computed field may choose its value from.

Re-exported by :mod:`flows.sop.model`, which holds the rest of the definition models. How values
are checked and normalised when entered is :mod:`flows.sop.normalize` (through
:mod:`flows.sop.inputs`); how a lookup's rows are checked against the field they choose by is
:mod:`flows.sop.lookup`.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = ["ID_PATTERN", "FieldSpec", "FieldType", "Finite", "FrozenSpec", "Id", "LookupRowSpec", "Regex"]


ID_PATTERN = r"^[a-z][a-z0-9_]*$"
"""Every id (SOP, step, field, param, role, product, institution) matches this."""

Id = Annotated[str, Field(pattern=ID_PATTERN)]


def _regex_compiles(value: str) -> str:
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
    return value


Regex = Annotated[str, AfterValidator(_regex_compiles)]
"""A regular expression, checked when the file loads; the error's path ends at its own key, so the
loader points at that key's line."""

Finite = Annotated[float, Field(allow_inf_nan=False)]
"""A number that is neither infinite nor not-a-number ('inf' in quotes is refused too)."""


class FrozenSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


FieldType = Literal["text", "number", "bool", "choice", "datetime", "product"]


class LookupRowSpec(FrozenSpec):
    """One row of a lookup: the range of the key it covers and the value it gives.

    The lower end is ``from`` (the key may equal it) or ``above`` (it may not); the upper end is
    ``to`` (inclusive) or ``below`` (exclusive). ``{from: 30, to: 300}`` holds 30 and 300;
    ``{above: 6, to: 60}`` holds 60 but not 6.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: Finite | None = Field(default=None, alias="from")
    above: Finite | None = None
    to: Finite | None = None
    below: Finite | None = None
    value: Finite | str

    @property
    def lower(self) -> tuple[float, bool]:
        """(lower end, whether the key may equal it)."""
        return (self.from_, True) if self.from_ is not None else (self.above or 0.0, False)

    @property
    def upper(self) -> tuple[float, bool]:
        """(upper end, whether the key may equal it)."""
        return (self.to, True) if self.to is not None else (self.below or 0.0, False)

    def holds(self, key: float) -> bool:
        (low, low_in), (high, high_in) = self.lower, self.upper
        return (low < key or (low_in and key == low)) and (key < high or (high_in and key == high))

    @model_validator(mode="before")
    @classmethod
    def _value_is_not_a_boolean(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("value"), bool):
            raise ValueError("'value' must be a number or text, not true/false (quote it to make it text)")
        return data

    @model_validator(mode="after")
    def _one_end_each(self) -> LookupRowSpec:
        problems = []
        if (self.from_ is None) == (self.above is None):
            problems.append("give exactly one lower end: 'from' (inclusive) or 'above' (exclusive)")
        if (self.to is None) == (self.below is None):
            problems.append("give exactly one upper end: 'to' (inclusive) or 'below' (exclusive)")
        if not problems:
            (low, low_in), (high, high_in) = self.lower, self.upper
            if low > high or (low == high and not (low_in and high_in)):
                problems.append(f"the range is empty: its lower end {low:g} is not below its upper end {high:g}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class FieldSpec(FrozenSpec):
    """A typed value a person enters in a step, or a run parameter.

    ``product`` is allowed only as a run parameter: its value is a product id from the
    institution's catalogue, and checks read the product's limits through it.
    """

    type: FieldType
    label: str | None = None
    help: str | None = None
    required: bool = True
    required_when: str | None = None
    """An expression over earlier steps and this step's values: when true, the field must be given
    (a physician who disagrees must give a reason). Implies ``required: false`` otherwise."""
    phi: bool = False
    """Protected health information: never echoed back in an error message."""
    # text
    pattern: Regex | None = None
    max_length: int | None = Field(default=None, gt=0)
    multiline: bool = False
    """Text of several lines (newlines and tabs allowed; other control characters never are)."""
    # number
    unit: str | None = None
    min: Finite | None = None
    max: Finite | None = None
    integer: bool = False
    """Whole numbers only (an ICE score, a count)."""
    # choice
    choices: tuple[str, ...] | None = None
    # datetime
    before_start: Literal["refused", "allowed"] = "refused"
    """A recorded time before the run started is refused, unless allowed (a collection time entered later)."""
    future: Literal["refused", "allowed"] = "refused"
    """A recorded time more than the clock skew ahead is refused, unless allowed: a time that is planned
    or due (a planned collection, a CAPA's due date, an effective date), not one that happened."""
    # identifiers (type text)
    format: Literal["isbt128_din", "coi"] | None = None
    """isbt128_din: ISBT 128 DIN with its Mod 37-2 check character; coi: the run's product's ``coi_pattern``."""
    compute: str | None = None
    """A step field nobody enters: this expression's value at submit time (number, text or choice fields)."""
    lookup: tuple[LookupRowSpec, ...] | None = Field(default=None, min_length=1)
    """With ``compute`` naming a number field: the value of the row whose range holds that field's value."""

    @model_validator(mode="before")
    @classmethod
    def _required_when_means_optional(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("required_when") is not None and "required" not in data:
            return {**data, "required": False}
        return data

    @model_validator(mode="after")
    def _type_specific(self) -> FieldSpec:
        problems = []
        if self.type != "text" and (self.pattern is not None or self.max_length is not None or self.multiline):
            problems.append(f"'pattern', 'max_length' and 'multiline' apply to type 'text', not {self.type!r}")
        if self.type != "number" and (
            self.min is not None or self.max is not None or self.unit is not None or self.integer
        ):
            problems.append(f"'unit', 'min', 'max' and 'integer' apply to type 'number', not {self.type!r}")
        if self.type == "choice" and not self.choices:
            problems.append("type 'choice' needs a non-empty 'choices' list")
        if self.type != "choice" and self.choices is not None:
            problems.append(f"'choices' applies to type 'choice', not {self.type!r}")
        for key in ("before_start", "future"):
            if self.type != "datetime" and key in self.model_fields_set:
                problems.append(f"{key!r} applies to type 'datetime', not {self.type!r}")
        if self.format is not None and self.type != "text":
            problems.append(f"'format' applies to type 'text', not {self.type!r}")
        if self.compute is not None and self.type not in ("number", "text", "choice"):
            problems.append(f"'compute' applies to types 'number', 'text' and 'choice', not {self.type!r}")
        if self.lookup is not None and self.compute is None:
            problems.append("'lookup' needs 'compute': the number field it chooses by, like 'ld_record.weight_kg'")
        if self.required_when is not None and (self.required or self.compute is not None):
            what = "'required: true'" if self.required else "'compute'"
            problems.append(f"'required_when' cannot go with {what}: it makes an entered field required when it holds")
        if self.min is not None and self.max is not None and self.min > self.max:
            problems.append(f"'min' ({self.min}) is greater than 'max' ({self.max})")
        if problems:
            raise ValueError("; ".join(problems))
        return self
