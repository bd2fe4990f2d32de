"""Stage 1 of the data path: what an SOP definition *is* (frozen pydantic models).

Pure definitions: no run state, no Prefect, no database. ``flows.sop`` must not import
``prefect``, ``sqlmodel`` or anything under ``flows.engine`` / ``flows.record``.

Files on disk (one folder per institution)::

    sops/<institution>/institution.yaml   InstitutionSpec: name, time zone, roles
    sops/<institution>/products.yaml      ProductCatalogSpec: the products checks can read
    sops/<institution>/<sop_id>.yaml      SopDefinition: params and steps

Step kinds (the ``kind`` key): :data:`STEP_KINDS` is the one table of them (each kind's spec,
whether a person signs it, its help line); ``StepSpec`` is the union of their specs.

Language keys beside them: ``when:`` on any step, ``compute:`` and ``format:`` on fields
(``coi_pattern`` on products), ``repeat:`` on record steps, SOP-level ``deadlines:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from flows.sop.fields import ID_PATTERN, FieldSpec, FieldType, Id, LookupRowSpec
from flows.sop.fields import FrozenSpec as _Frozen
from flows.sop.institution import InstitutionSpec, ProductCatalogSpec, ProductSpec, RoleSpec
from flows.sop.text import LANGUAGES, Localized, Text, text_in

__all__ = [
    "DEVIATION_EVENTS",
    "HOLDING_CLASSES",
    "HOLD_ROLE",
    "HUMAN_KINDS",
    "ID_PATTERN",
    "LANGUAGES",
    "STEP_KINDS",
    "STEP_REF_PATTERN",
    "ApproveStepSpec",
    "CheckStepSpec",
    "DeadlineDeviationSpec",
    "DeadlineSpec",
    "DeviationSpec",
    "DocumentStepSpec",
    "FieldSpec",
    "FieldType",
    "HumanStepSpec",
    "InstitutionSpec",
    "Localized",
    "LookupRowSpec",
    "NotifyStepSpec",
    "ProductCatalogSpec",
    "ProductSpec",
    "RecordStepSpec",
    "RepeatSpec",
    "RoleSpec",
    "SopDefinition",
    "StepKind",
    "StepSpec",
    "SubrunStepSpec",
    "TimeoutDeviationSpec",
    "VerifyStepSpec",
    "format_duration",
    "parse_duration",
    "text_in",
]


_DURATION = re.compile(r"^ *([0-9]{1,9}(?:\.[0-9]{1,6})?) *(s|m|min|h|d) *$")
_UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_MAX_DURATION = timedelta(days=3660)
"""Ten years: longer than any time limit an SOP sets, and far from timedelta's overflow."""


def parse_duration(value: Any) -> Any:
    """'90s', '30m', '4h', '2d' -> timedelta; other values pass through for pydantic to judge."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"expected a duration like '30m', '4h' or '2d', got {value!r}")
        if float(m.group(1)) * _UNIT_SECONDS[m.group(2)] > _MAX_DURATION.total_seconds():
            raise ValueError(f"{value!r} is longer than the longest duration allowed, {_MAX_DURATION.days} days")
        return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def format_duration(value: timedelta) -> str:
    """The inverse of ``parse_duration``: 4 h -> '4h', 90 s -> '90s' (the largest whole unit)."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class TimeoutDeviationSpec(_Frozen):
    """The deviation a human step opens when it times out with ``on_timeout: deviation``."""

    classification: Literal["minor", "major", "critical"] = "minor"
    description: str | None = None


DeviationEventKind = Literal[
    "contained", "mah_notified", "investigated", "disposition", "capa", "effectiveness", "closed"
]
DEVIATION_EVENTS: tuple[str, ...] = DeviationEventKind.__args__  # type: ignore[attr-defined]
"""A deviation's lifecycle, in its usual order (``flows.record.deviations``)."""


class _StepBase(_Frozen):
    if TYPE_CHECKING:  # each kind's spec declares its own Literal; readers of any step may read it
        kind: str
    id: Id
    title: Text | None = None
    description: Text | None = None
    when: str | None = None
    """Expression read when the walk reaches the step; false: the step is recorded ``skipped`` and never runs."""


class HumanStepSpec(_StepBase):
    """A step that waits for a person's signed input."""

    role: Id
    meaning: Text | None = None
    """What the signature means, as shown beside it ('Verified dose identity against order')."""
    fields: dict[Id, FieldSpec] = Field(default_factory=dict)
    timeout: Duration | None = None
    """How long the step may wait for its signer before ``on_timeout`` applies."""
    escalate_to: Id | None = None
    """The role told when the step has waited longer than ``timeout``."""
    on_timeout: Literal["escalate", "deviation"] = "escalate"
    """escalate: tell ``escalate_to``; deviation: also open a deviation (``timeout_deviation``). The step keeps waiting."""
    timeout_deviation: TimeoutDeviationSpec = Field(default_factory=TimeoutDeviationSpec)
    updates_deviation: DeviationEventKind | None = None
    """Done = this lifecycle event of the deviation named by the run's ``deviation_id`` param."""


class RepeatSpec(_Frozen):
    """Repeated measurements: each repetition ``<step>#<n>`` is its own signed record."""

    every: Duration
    """The next repetition is due this long after the previous one was signed."""
    times: int = Field(ge=1)
    """At most this many repetitions."""
    until: str | None = None
    """Read after each repetition (``<step>`` is the latest, ``<step>_all`` all of them); true ends the step."""


class RecordStepSpec(HumanStepSpec):
    kind: Literal["record"]
    fields: dict[Id, FieldSpec]
    repeat: RepeatSpec | None = None


class VerifyStepSpec(HumanStepSpec):
    kind: Literal["verify"]
    of: Id
    """The step whose data this verifies; its performer may never sign this one."""


class ApproveStepSpec(HumanStepSpec):
    kind: Literal["approve"]
    meaning: Text
    signs_as: Literal["approved", "reviewed"] = "approved"
    """The signature's meaning when the decision is approve (``reviewed`` for a review)."""


HOLDING_CLASSES = frozenset({"major", "critical"})
"""The classifications whose open deviation holds its run's completion (and so its dose's release)."""
HOLD_ROLE = "qa"
"""Who signs the disposition of a deviation that holds a run's completion (a deadline's, a time-out's,
one raised by hand): ``flows.record.deviations.holding_deviations``."""


class DeviationSpec(_Frozen):
    classification: Literal["minor", "major", "critical"] = "major"
    description: Text | None = None
    quarantine: bool = True
    """The dose is quarantined until QA signs a disposition."""
    disposition_role: Id = "qa"
    sop: Id | None = None
    """An SOP of the institution run as a sub-run to handle the deviation (params ``deviation_id``,
    ``coi``, ``parent_run_id``); its ``updates_deviation: disposition`` step decides instead of the
    inline ``<check>__disposition`` step."""


class CheckStepSpec(_StepBase):
    kind: Literal["check"]
    expect: str
    """Sandboxed Jinja expression over ``params``, ``product`` and earlier steps' data."""
    on_fail: Literal["deviation", "stop"] = "deviation"
    """deviation: open one and wait for a signed disposition; stop: open one and end the run."""
    deviation: DeviationSpec = Field(default_factory=DeviationSpec)


class DocumentStepSpec(_StepBase):
    kind: Literal["document"]
    template: str
    """``record.html.j2`` resolves to ``record.<language>.html.j2`` when that file exists."""
    language: Literal["en", "zh"] | None = None
    """Overrides the institution's ``language`` for this document."""
    pdf: bool = True
    """Also render a PDF (WeasyPrint) beside the HTML."""


class NotifyStepSpec(_StepBase):
    kind: Literal["notify"]
    to: tuple[Id, ...] = Field(min_length=1)
    message: str
    """Jinja template string over ``params``, ``product``, ``run`` and earlier steps' data."""


class SubrunStepSpec(_StepBase):
    kind: Literal["subrun"]
    sop: Id
    """An SOP id of the same institution."""
    params: dict[Id, str] = Field(default_factory=dict)
    """Param name -> expression over this run's context, evaluated when the sub-run starts."""
    wait: bool = True
    """Wait until the sub-run ends; later steps read ``<step>.status`` and ``<step>.<sub_step>.<field>``."""


StepSpec = Annotated[
    RecordStepSpec
    | VerifyStepSpec
    | ApproveStepSpec
    | CheckStepSpec
    | DocumentStepSpec
    | NotifyStepSpec
    | SubrunStepSpec,
    Field(discriminator="kind"),
]


@dataclass(frozen=True)
class StepKind:
    """One row of :data:`STEP_KINDS`: the spec a ``kind:`` key selects, whether a person signs it, and
    the one-line help the README and ``sopflow sop show`` give."""

    spec: type[_StepBase]
    human: bool
    help: str


STEP_KINDS: dict[str, StepKind] = {
    "record": StepKind(RecordStepSpec, True, "a person enters typed fields and signs as performer"),
    "verify": StepKind(
        VerifyStepSpec, True, "a second person confirms another step's data and signs as verifier (never its performer)"
    ),
    "approve": StepKind(
        ApproveStepSpec, True, "a role signs a decision, approve or reject, with the SOP's stated meaning"
    ),
    "check": StepKind(
        CheckStepSpec, False, "an acceptance expression over earlier data and the product; failure opens a deviation"
    ),
    "document": StepKind(DocumentStepSpec, False, "renders a Jinja template into a stored document with its sha256"),
    "notify": StepKind(NotifyStepSpec, False, "sends an apprise message to the channels of the named roles"),
    "subrun": StepKind(
        SubrunStepSpec,
        False,
        "starts a run of another SOP of the institution linked to this one; with wait, waits for its end",
    ),
}
"""The one table of step kinds. ``StepSpec`` (above) is its union, the JSON Schema is built from
that, the engine walks a step by its row (``flows.engine.run_sop``) and the services tell human
steps by ``HUMAN_KINDS``; ``tests/test_step_kinds.py`` ties them together."""

HUMAN_KINDS = frozenset(kind for kind, row in STEP_KINDS.items() if row.human)
"""The kinds a person signs: they suspend the run until a signed input arrives."""

STEP_REF_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?$"
"""A deadline's end: ``<step>.<datetime field>``, or ``<step>`` (the time that step was signed)."""


class DeadlineDeviationSpec(_Frozen):
    """The deviation a breached deadline opens; the run goes on, and a ``major`` or ``critical`` one
    (the default class is ``major``) holds its completion until QA signs the disposition."""

    classification: Literal["minor", "major", "critical"] = "major"
    description: str | None = None
    quarantine: bool = False
    notify: tuple[Id, ...] = ("qa",)
    """The roles told when it opens."""


class DeadlineSpec(_Frozen):
    """A time limit between two recorded times of a run (``deadlines:``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    id: Id
    title: Text | None = None
    from_: str = Field(alias="from", pattern=STEP_REF_PATTERN)
    to: str = Field(pattern=STEP_REF_PATTERN)
    within: Duration | None = None
    within_min: str | None = None
    """An expression over ``params``, ``product`` and ``run`` giving the limit in minutes."""
    deviation: DeadlineDeviationSpec = Field(default_factory=DeadlineDeviationSpec)

    @model_validator(mode="after")
    def _one_limit(self) -> DeadlineSpec:
        if (self.within is None) == (self.within_min is None):
            raise ValueError(
                "give exactly one of 'within' (a duration like '30m') and 'within_min' (an expression in minutes)"
            )
        return self


class SopDefinition(_Frozen):
    """One SOP revision: ``sops/<institution>/<id>.yaml``."""

    schema_version: Literal[1]
    id: Id
    title: Text
    version: int = Field(ge=1)
    description: Text | None = None
    params: dict[Id, FieldSpec] = Field(default_factory=dict)
    steps: tuple[StepSpec, ...] = Field(min_length=1)
    distinct_signers: tuple[tuple[Id, ...], ...] = ()
    """Groups of human steps that must each be signed by a different person."""
    start_roles: tuple[Id, ...] = ()
    """Roles that may start a run of this SOP (e.g. the quality manager starts a dose receipt);
    empty: anyone holding a role at the institution. Sub-runs are started by the system."""
    deadlines: tuple[DeadlineSpec, ...] = ()
    """Time limits between recorded times; a breach opens a deviation and the run goes on (a major or
    critical one holds its completion until the disposition is signed)."""
    min_trained: int = Field(default=1, ge=1, le=1000)
    """How many active people trained on a version each role that signs in it needs before the
    version may turn Effective (change control); until then it waits, Issued."""
    chain_stage: Literal["collection", "receipt", "storage", "infusion"] | None = None
    """Which link of a dose's chain of identity a completed run of this SOP is (``sopflow chain``)."""

    def step(self, step_id: str) -> StepSpec:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def product_param(self) -> str | None:
        """The name of the run parameter of type ``product``, if any."""
        for name, spec in self.params.items():
            if spec.type == "product":
                return name
        return None
