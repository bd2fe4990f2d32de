"""Stage 1 of the data path: the cross-checks of an SOP's expressions (``expect:``, ``when:``,
``compute:``, ``required_when:``, ``repeat.until``, notify messages, sub-run params) and lookups.

What each expression may read is its :class:`~flows.sop.expressions.Scope`: params, the product
(with a product param), earlier human steps (a step that failed validation reads as anything: its
own problems are reported), ``run`` in messages. :class:`ExpressionChecks` is the part of
``flows.sop.check``'s checker that builds scopes and reports what the expressions read wrongly.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

from flows.sop.expressions import Scope, check_expression, check_message
from flows.sop.lookup import key_fields, lookup_problems
from flows.sop.model import (
    ApproveStepSpec,
    CheckStepSpec,
    HumanStepSpec,
    NotifyStepSpec,
    ProductSpec,
    RecordStepSpec,
    SopDefinition,
    SubrunStepSpec,
    VerifyStepSpec,
)
from flows.sop.source import UnparsedStep

__all__ = ["RESERVED_NAMES", "ExpressionChecks"]

RESERVED_NAMES = frozenset({"params", "product", "run"})
"""Top-level names in expressions; no step may take one as its id."""


class _AnyName(frozenset[str]):
    """Every attribute: a sub-run step's data are its SOP's steps, checked in that SOP's file."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY_NAME = _AnyName()


class ExpressionChecks:
    """Scopes and expression checks; the checker that uses it provides ``defn`` and ``add``."""

    defn: SopDefinition

    def add(self, loc: tuple[str | int, ...], message: str) -> None:
        raise NotImplementedError

    def _scope(self, position: int, *, message: bool, reader: str | None = None) -> Scope:
        names: dict[str, frozenset[str]] = {"params": frozenset(self.defn.params)}
        unavailable: dict[str, str] = {}
        if self.defn.product_param() is not None:
            names["product"] = frozenset(ProductSpec.model_fields)
        else:
            unavailable["product"] = "is only available when the SOP declares a param of type 'product'"
        if message or reader is not None:
            names["run"] = frozenset({"id", "sop_id", "institution"})
        else:
            unavailable["run"] = "is only available in notify messages"
        reader = reader or ("a notify message" if message else "a check")
        for i, step in enumerate(self.defn.steps):
            if step.id in names or step.id in RESERVED_NAMES:
                continue
            if isinstance(step, UnparsedStep):
                if i < position:
                    names[step.id] = _ANY_NAME  # its own problems are reported; read it as anything
                    if step.repeated:
                        names[f"{step.id}_all"] = _ANY_NAME
                else:
                    unavailable[step.id] = f"is a later step; {reader} can only read steps before it"
                continue
            if isinstance(step, SubrunStepSpec) and i < position and step.wait:
                names[step.id] = _ANY_NAME  # status, run_id and the sub-run's steps: another file's
            elif not isinstance(step, HumanStepSpec):
                unavailable[step.id] = f"is a {step.kind} step and has no data to read"
            elif i >= position:
                unavailable[step.id] = f"is a later step; {reader} can only read steps before it"
            else:
                extra = {"signed_by", "decision"} if isinstance(step, ApproveStepSpec) else {"signed_by"}
                names[step.id] = frozenset(step.fields) | extra
            if getattr(step, "repeat", None) is not None:
                if step.id in names:
                    names[f"{step.id}_all"] = frozenset()  # a list: read by index or filters
                else:
                    unavailable[f"{step.id}_all"] = unavailable[step.id]
        return Scope(names, unavailable)

    def expressions(self) -> None:
        for i, step in enumerate(self.defn.steps):
            if isinstance(step, CheckStepSpec):
                for msg in check_expression(step.expect, self._scope(i, message=False)):
                    self.add(("steps", i, "expect"), f"step {step.id!r}: {msg}")
            elif isinstance(step, NotifyStepSpec):
                for msg in check_message(step.message, self._scope(i, message=True)):
                    self.add(("steps", i, "message"), f"step {step.id!r}: {msg}")
            if isinstance(step, HumanStepSpec):
                self.computed(i, step)
            if isinstance(step, RecordStepSpec) and step.repeat is not None:
                self.repeated(i, step)
            if step.when is not None:
                scope = self._scope(i, message=False, reader="a 'when' condition")
                for msg in check_expression(step.when, scope):
                    self.add(("steps", i, "when"), f"step {step.id!r}: {msg}")

    def repeated(self, i: int, step: RecordStepSpec) -> None:
        """``repeat.until`` reads this step's latest repetition and ``<step>_all``; nothing may
        verify a repeated step, group it in ``distinct_signers`` or take the name ``<step>_all``."""
        until = step.repeat.until if step.repeat is not None else None
        if until is not None:
            scope = self._scope(i + 1, message=False, reader="an 'until' condition")
            for msg in check_expression(until, scope):
                self.add(("steps", i, "repeat", "until"), f"step {step.id!r}: {msg}")
        for j, other in enumerate(self.defn.steps):
            if other.id == f"{step.id}_all":
                self.add(
                    ("steps", j, "id"),
                    f"step id {other.id!r} is taken: expressions read the repetitions of {step.id!r} under that name",
                )
            if isinstance(other, VerifyStepSpec) and other.of == step.id:
                self.add(("steps", j, "of"), f"{step.id!r} is repeated; verify cannot check a repeated step")
        for g, group in enumerate(self.defn.distinct_signers):
            if step.id in group:
                self.add(
                    ("distinct_signers", g, group.index(step.id)),
                    f"{step.id!r} is repeated; distinct_signers cannot name a repeated step",
                )

    def computed(self, i: int, step: HumanStepSpec) -> None:
        """``compute:`` reads earlier steps and this step's entered fields and earlier computed ones;
        ``required_when:`` reads all of this step's fields; a ``lookup`` must cover its key's range."""
        scope = self._scope(i, message=False, reader="a computed field")
        readable = {n for n, f in step.fields.items() if f.compute is None}
        keys = key_fields(self.defn.steps, self.defn.params, i)
        for name, spec in step.fields.items():
            loc = ("steps", i, "fields", name)
            if spec.required_when is not None:
                every = Scope(
                    {**scope.names, step.id: frozenset(step.fields)},
                    {k: v for k, v in scope.unavailable.items() if k != step.id},
                )
                for msg in check_expression(spec.required_when, every):
                    self.add((*loc, "required_when"), f"step {step.id!r}: {msg}")
            if spec.compute is None:
                continue
            here = Scope(
                {**scope.names, step.id: frozenset(readable)},
                {k: v for k, v in scope.unavailable.items() if k != step.id},
            )
            for msg in check_expression(spec.compute, here):
                self.add((*loc, "compute"), f"step {step.id!r}: {msg}")
            rows, key = lookup_problems(spec, keys)
            for sub, msg in rows:
                self.add((*loc, "lookup", *sub), f"step {step.id!r}: lookup: {msg}")
            for msg in key:
                self.add((*loc, "compute"), f"step {step.id!r}: lookup: {msg}")
            readable.add(name)
