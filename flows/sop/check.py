"""Stage 1 of the data path: cross-references inside a schema-valid SOP definition.

Unique step ids, roles that exist in the institution, ``verify.of`` pointing back at an earlier
step, ``distinct_signers`` naming signed steps, the single ``product`` param, document templates
that exist, and the names used by check expressions and notify messages. Every problem is
returned (never raised one by one) with the line of the YAML key it is about.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.errors import Problem, did_you_mean
from flows.sop.check_expressions import RESERVED_NAMES, ExpressionChecks
from flows.sop.expressions import Scope, check_expression
from flows.sop.model import (
    HUMAN_KINDS,
    ApproveStepSpec,
    CheckStepSpec,
    DocumentStepSpec,
    FieldSpec,
    HumanStepSpec,
    InstitutionSpec,
    NotifyStepSpec,
    SubrunStepSpec,
    VerifyStepSpec,
)
from flows.sop.source import LoadedSop, UnparsedDeadline, UnparsedStep, display_path, dotted
from flows.sop.templates import find_template, localized_name, template_name, template_names

__all__ = ["RESERVED_NAMES", "check_sop", "find_template", "localized_name", "template_name"]

_IMPLICIT_FIELDS = frozenset({"signed_by", "decision"})
"""Values every human step (``decision``: approve steps) has besides its declared fields."""
_CAPA_FIELDS = {"action": ("text",), "owner": ("text",), "due": ("datetime",)}


class _Checker(ExpressionChecks):
    def __init__(
        self,
        loaded: LoadedSop,
        institution: InstitutionSpec | None,
        templates_dir: Path | None,
    ) -> None:
        self.loaded = loaded
        self.defn = loaded.definition
        self.institution = institution
        self.templates_dir = templates_dir
        self.file = display_path(loaded.path)
        self.problems: list[Problem] = []

    def add(self, loc: tuple[str | int, ...], message: str) -> None:
        self.problems.append(Problem(self.file, self.loaded.lines.line(*loc), dotted(loc), message))

    def run(self) -> list[Problem]:
        self.step_ids()
        self.params()
        self.roles()
        self.verify_targets()
        self.distinct_signers()
        self.templates()
        self.expressions()
        self.identifier_formats()
        self.deadlines()
        self.subruns()
        return sorted(self.problems, key=lambda p: (p.line or 0, p.path))

    def step_ids(self) -> None:
        first: dict[str, int] = {}
        for i, step in enumerate(self.defn.steps):
            if step.id in RESERVED_NAMES:
                self.add(
                    ("steps", i, "id"),
                    f"step id {step.id!r} is reserved (expressions use it for run data)",
                )
            if step.id in first and step.id:
                line = self.loaded.lines.line("steps", first[step.id], "id")
                self.add(
                    ("steps", i, "id"),
                    f"duplicate step id {step.id!r} (first used at line {line})",
                )
            else:
                first[step.id] = i
            if isinstance(step, HumanStepSpec):
                for name, spec in step.fields.items():
                    if name in _IMPLICIT_FIELDS:
                        self.add(
                            ("steps", i, "fields", name),
                            f"field name {name!r} is reserved for the signature",
                        )
                    if spec.type == "product":
                        self.add(
                            ("steps", i, "fields", name, "type"),
                            "type 'product' is only allowed for params, not for step fields",
                        )
                if step.escalate_to is not None and step.timeout is None:
                    self.add(
                        ("steps", i, "escalate_to"),
                        "'escalate_to' needs a 'timeout' to escalate after",
                    )
                if step.timeout is None and {"on_timeout", "timeout_deviation"} & step.model_fields_set:
                    key = "on_timeout" if "on_timeout" in step.model_fields_set else "timeout_deviation"
                    self.add(("steps", i, key), f"{key!r} needs a 'timeout' to apply after")
                if step.timeout is not None and step.on_timeout == "escalate" and step.escalate_to is None:
                    self.add(
                        ("steps", i, "timeout"),
                        "a 'timeout' with on_timeout 'escalate' needs 'escalate_to': the role to tell",
                    )

    def params(self) -> None:
        first: str | None = None
        for name, spec in self.defn.params.items():
            if spec.compute is not None:
                self.add(("params", name, "compute"), "'compute' applies to step fields, not params")
            if spec.type != "product":
                continue
            if first is None:
                first = name
            else:
                self.add(
                    ("params", name, "type"),
                    f"only one param may have type 'product'; {first!r} already has it",
                )

    def identifier_formats(self) -> None:
        if self.defn.product_param() is not None:
            return
        places: list[tuple[tuple[str | int, ...], FieldSpec]] = [
            (("params", n), f) for n, f in self.defn.params.items()
        ]
        for i, step in enumerate(self.defn.steps):
            if isinstance(step, HumanStepSpec):
                places += [(("steps", i, "fields", n), f) for n, f in step.fields.items()]
        for loc, spec in places:
            if spec.format == "coi":
                self.add(
                    (*loc, "format"),
                    "format 'coi' checks against the run's product's 'coi_pattern'; "
                    "the SOP needs a param of type 'product'",
                )

    def deadlines(self) -> None:
        steps = {s.id: s for s in self.defn.steps}
        seen: set[str] = set()
        for d, spec in enumerate(self.defn.deadlines):
            if isinstance(spec, UnparsedDeadline):
                seen.add(spec.id)
                continue
            if spec.id in seen or spec.id in steps:
                what = "another deadline" if spec.id in seen else "a step"
                self.add(("deadlines", d, "id"), f"deadline id {spec.id!r} is already used by {what}")
            seen.add(spec.id)
            for key, ref in (("from", spec.from_), ("to", spec.to)):
                problem = self._deadline_end(ref, steps)
                if problem:
                    self.add(("deadlines", d, key), f"deadline {spec.id!r}: {problem}")
            if spec.within_min is not None:
                base = self._scope(0, message=False, reader="a deadline's 'within_min'")
                scope = Scope(
                    base.names,
                    {
                        k: v
                        if k in RESERVED_NAMES
                        else "is a step; a deadline's 'within_min' reads only params, product and run"
                        for k, v in base.unavailable.items()
                    },
                )
                for msg in check_expression(spec.within_min, scope):
                    self.add(("deadlines", d, "within_min"), f"deadline {spec.id!r}: {msg}")
            for j, role in enumerate(spec.deviation.notify):
                self._role(("deadlines", d, "deviation", "notify", j), role)

    def _deadline_end(self, ref: str, steps: dict[str, Any]) -> str | None:
        step_id, _, field = ref.partition(".")
        step = steps.get(step_id)
        if isinstance(step, UnparsedStep):
            return None
        if step is None:
            return f"unknown step {step_id!r}. {did_you_mean(step_id, sorted(steps), 'Steps')}".rstrip()
        if not isinstance(step, HumanStepSpec):
            return f"{step_id!r} is a {step.kind} step; a deadline's end is a signed step or one of its datetime fields"
        if getattr(step, "repeat", None) is not None:
            return f"{step_id!r} is repeated; a deadline cannot name a repeated step"
        if field and field not in step.fields:
            return f"step {step_id!r} has no field {field!r}. {did_you_mean(field, sorted(step.fields), 'Fields')}".rstrip()
        if field and step.fields[field].type != "datetime":
            return f"{ref!r} is a {step.fields[field].type} field; a deadline's end must be of type 'datetime'"
        return None

    def _role(self, loc: tuple[str | int, ...], role: str) -> None:
        if self.institution is None or role in self.institution.roles:
            return
        roles = list(self.institution.roles)
        hint = did_you_mean(role, sorted(roles), f"Roles of {self.institution.id}")
        self.add(loc, f"unknown role {role!r}. {hint}")

    def roles(self) -> None:
        for j, role in enumerate(self.defn.start_roles):
            self._role(("start_roles", j), role)
        for i, step in enumerate(self.defn.steps):
            if isinstance(step, HumanStepSpec):
                self._role(("steps", i, "role"), step.role)
                if step.escalate_to is not None:
                    self._role(("steps", i, "escalate_to"), step.escalate_to)
            elif isinstance(step, CheckStepSpec):
                self._role(
                    ("steps", i, "deviation", "disposition_role"),
                    step.deviation.disposition_role,
                )
            elif isinstance(step, NotifyStepSpec):
                for j, role in enumerate(step.to):
                    self._role(("steps", i, "to", j), role)

    def verify_targets(self) -> None:
        index = {s.id: i for i, s in reversed(list(enumerate(self.defn.steps)))}
        for i, step in enumerate(self.defn.steps):
            if not isinstance(step, VerifyStepSpec):
                continue
            loc = ("steps", i, "of")
            target = index.get(step.of)
            if target is None:
                self.add(
                    loc,
                    f"unknown step {step.of!r}. {did_you_mean(step.of, sorted(index), 'Steps')}".rstrip(),
                )
            elif target == i:
                self.add(loc, f"step {step.id!r} cannot verify itself")
            elif target > i:
                self.add(
                    loc,
                    f"{step.of!r} comes after {step.id!r}; verify can only check an earlier step",
                )
            elif isinstance(self.defn.steps[target], UnparsedStep):
                continue
            elif self.defn.steps[target].kind not in ("record", "approve"):
                kind = self.defn.steps[target].kind
                self.add(
                    loc,
                    f"{step.of!r} is a {kind} step; 'of' must name a record or approve step",
                )

    def distinct_signers(self) -> None:
        kinds = {s.id: s.kind for s in self.defn.steps}
        unparsed = {s.id for s in self.defn.steps if isinstance(s, UnparsedStep)}
        human = [s.id for s in self.defn.steps if s.kind in HUMAN_KINDS]
        for g, group in enumerate(self.defn.distinct_signers):
            if len(set(group)) < 2:
                self.add(
                    ("distinct_signers", g),
                    "a group needs at least two different steps",
                )
            for j, step_id in enumerate(group):
                loc = ("distinct_signers", g, j)
                if step_id not in kinds:
                    self.add(
                        loc,
                        f"unknown step {step_id!r}. {did_you_mean(step_id, sorted(human), 'Signed steps')}".rstrip(),
                    )
                elif kinds[step_id] not in HUMAN_KINDS and step_id not in unparsed:
                    self.add(
                        loc,
                        f"{step_id!r} is a {kinds[step_id]} step; only record, verify and approve steps are signed",
                    )

    def templates(self) -> None:
        if self.templates_dir is None:
            return
        inst = self.institution.id if self.institution is not None else None
        inst_language = self.institution.language if self.institution is not None else None
        for i, step in enumerate(self.defn.steps):
            if not isinstance(step, DocumentStepSpec) or template_name(
                step.template, self.templates_dir, inst, step.language or inst_language
            ):
                continue
            base = display_path(self.templates_dir)
            where = f"{base}/{inst}/ or {base}/" if inst else f"{base}/"
            hint = did_you_mean(step.template, sorted(template_names(self.templates_dir, inst)), "Templates")
            self.add(
                ("steps", i, "template"),
                f"template {step.template!r} not found in {where}. {hint}".rstrip(),
            )

    def subruns(self) -> None:
        """``subrun`` steps and deviation SOPs name a sibling SOP; ``updates_deviation`` needs ``deviation_id``."""
        here = self.loaded.path.parent if self.institution is not None else None

        def sibling(loc: tuple[str | int, ...], sop_id: str) -> None:
            if sop_id == self.defn.id:
                self.add(loc, f"SOP {sop_id!r} cannot run itself as a sub-run")
            elif here is not None and not (here / f"{sop_id}.yaml").is_file():
                ids = sorted(p.stem for p in here.glob("*.yaml") if p.stem not in ("institution", "products"))
                self.add(
                    loc,
                    f"unknown SOP {sop_id!r} in {self.institution.id if self.institution else ''}. "
                    f"{did_you_mean(sop_id, sorted(ids), 'SOPs')}".rstrip(),
                )

        for i, step in enumerate(self.defn.steps):
            if isinstance(step, SubrunStepSpec):
                sibling(("steps", i, "sop"), step.sop)
                for name, expr in step.params.items():
                    for msg in check_expression(expr, self._scope(i, message=False)):
                        self.add(("steps", i, "params", name), f"step {step.id!r}: {msg}")
            elif isinstance(step, CheckStepSpec) and step.deviation.sop is not None:
                sibling(("steps", i, "deviation", "sop"), step.deviation.sop)
            elif isinstance(step, HumanStepSpec) and step.updates_deviation is not None:
                if "deviation_id" not in self.defn.params:
                    self.add(
                        ("steps", i, "updates_deviation"),
                        "'updates_deviation' needs a param 'deviation_id' (the deviation the run handles)",
                    )
                decides = isinstance(step, ApproveStepSpec) or any(
                    f.type == "choice" for n, f in step.fields.items() if n in ("decision", "outcome", "disposition")
                )
                if step.updates_deviation == "disposition" and not decides:
                    self.add(
                        ("steps", i, "updates_deviation"),
                        "a 'disposition' step must be an approve step or have a choice field "
                        "'decision', 'outcome' or 'disposition' (the dose's disposition)",
                    )
                if step.updates_deviation == "capa":
                    for name, types in _CAPA_FIELDS.items():
                        spec = step.fields.get(name)
                        if spec is None or spec.type not in types:
                            self.add(
                                ("steps", i, "fields"), f"a 'capa' step needs a field {name!r} of type {types[0]!r}"
                            )


def check_sop(
    loaded: LoadedSop,
    *,
    institution: InstitutionSpec | None = None,
    templates_dir: Path | None = None,
) -> list[Problem]:
    """Every cross-reference problem in a schema-valid SOP (empty list: all good).

    Roles are checked only with ``institution``, templates only with ``templates_dir``.
    Returns the problems; raises nothing.
    """
    return _Checker(loaded, institution, templates_dir).run()
