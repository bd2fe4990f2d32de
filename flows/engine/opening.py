"""Stage 2: the one way a run is opened, for ``sopflow start`` and for sub-runs alike.

``prepare_run`` makes every check a new run must pass before anything is written, against the
version it will be pinned to (``flows.record.versions.effective_sop``):

- its parameters satisfy the SOP (``flows.sop.inputs.coerce_values``);
- its product, when it has one, has no value left ``unconfirmed`` in the catalogue;
- every deadline's ``within_min`` gives a time limit for that product;
- a ``deviation_id`` parameter names a deviation, in an SOP whose steps update one;
- its dose (COI) is not quarantined by another run's open deviation (``held_by``: the run that
  opened it, its sub-runs and a run handling it are not held).

``open_run`` then writes the run's record (``SopRun`` pinned to the version, ``scheduled``) and
releases its flow run to the executors. What differs between the two callers is deliberate and
lives with them: ``flows.services.runs.start_run`` adds who may start (sign-in, a role at the
institution, ``start_roles``) and refuses a quarantined dose; a sub-run (``flows.engine.subruns``)
is started by the system on behalf of its parent's starter, so no one signs in, and a refusal of
any check holds the parent's step, saying why, until the check passes (the executor's sweep
re-checks it), rather than failing a run that carries a patient's dose.

No Prefect import here beyond ``flows.engine.client``'s (which imports it lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from flows.config import Settings
from flows.engine.client import create_flow_run, release_flow_run
from flows.engine.operators import flow_run_name, flow_run_parameters, flow_run_tags
from flows.engine.steps import set_run_status
from flows.errors import SopInputError
from flows.record import ledger
from flows.record.db import init_db, read_session, write_session
from flows.record.deadlines import limit_of
from flows.record.deviations import check_deviation_param, coi_param, quarantine_problem
from flows.record.tables import SopRun, new_id, utcnow
from flows.record.versions import PinnedSop
from flows.sop.catalog import Catalog
from flows.sop.expressions import ExpressionError
from flows.sop.inputs import coerce_values
from flows.sop.model import SopDefinition

__all__ = ["OpenedRun", "PreparedRun", "open_run", "prepare_run"]


@dataclass(frozen=True)
class PreparedRun:
    """A run that passed ``prepare_run``: its checked parameters and its product as it stands now."""

    pinned: PinnedSop
    params: dict[str, Any]
    product: dict[str, Any] | None
    held_by: str | None
    """Why the run's dose may not go on now (a quarantine), or None."""


@dataclass(frozen=True)
class OpenedRun:
    run_id: str
    flow_run_id: str


def prepare_run(
    settings: Settings,
    institution: str,
    pinned: PinnedSop,
    raw_params: dict[str, Any],
    *,
    where: str,
    lineage: str | None = None,
) -> PreparedRun:
    """Check a new run of ``pinned`` before anything is written (see the module docstring).

    ``where`` names the parameters in messages; ``lineage`` is the parent run of a sub-run (it and
    its ancestors may handle a quarantine they opened).

    Raises:
        SopInputError (every problem of the parameters, an unconfirmed product, a deadline without a
        limit, a ``deviation_id`` that names no deviation), SopNotFoundError, SopDefinitionError
    """
    sop = pinned.definition
    products = Catalog(settings.sops_dir, settings.templates_dir).products(institution)
    params = coerce_values(
        sop.params,
        raw_params,
        where=where,
        products=products,
        now=utcnow(),
        future_skew=timedelta(minutes=settings.future_skew_minutes),
    )
    product = None
    if (pname := sop.product_param()) is not None and params.get(pname) is not None:
        spec = products[params[pname]]
        if spec.unconfirmed:
            raise SopInputError(
                [
                    f"{sop.id} params.{pname}: product {params[pname]!r} has values not confirmed against its label: "
                    f"{', '.join(spec.unconfirmed)}; set them in sops/{institution}/products.yaml and remove them "
                    "from 'unconfirmed' before a run may use this product"
                ]
            )
        product = spec.model_dump(mode="json")
    _check_deadline_limits(sop, institution, params, product)
    init_db(settings.database_url)
    with read_session(settings.database_url) as s:
        check_deviation_param(s, sop, params)
        coi = params.get(coi_param(sop, params) or "")
        held_by = quarantine_problem(
            s, str(coi) if coi else None, run_id=lineage, deviation_id=params.get("deviation_id")
        )
    return PreparedRun(pinned, params, product, held_by)


def _check_deadline_limits(
    sop: SopDefinition, institution: str, params: dict[str, Any], product: dict[str, Any] | None
) -> None:
    """Every ``within_min`` gives a limit for this run's product: a deadline nobody can measure is refused."""
    context = {"params": params, "product": product, "run": {"id": None, "sop_id": sop.id, "institution": institution}}
    problems = []
    for spec in sop.deadlines:
        try:
            limit_of(spec, context)
        except ExpressionError as exc:
            problems.append(
                f"{sop.id} deadlines.{spec.id}: no time limit for this run: {exc}; "
                f"set the value in sops/{institution}/products.yaml"
            )
    if problems:
        raise SopInputError(problems)


def open_run(
    settings: Settings,
    institution: str,
    prepared: PreparedRun,
    *,
    started_by: str,
    actor: str,
    reason: str | None = None,
    parent_run_id: str | None = None,
    parent_step_id: str | None = None,
    also: Callable[[Session, str], None] | None = None,
) -> OpenedRun:
    """Record the run (pinned, ``scheduled``) and release its flow run; ``also(session, run_id)``
    writes more in the same transaction (a deviation's ``subrun`` event).

    The flow run is created first, held (the record must name it), and cancelled when the record
    cannot be written, so Prefect never runs a run sopflow has no record of.

    Raises:
        EngineError (Prefect unreachable), RecordError
    """
    sop = prepared.pinned.definition
    run_id = new_id()
    flow_run_id = create_flow_run(
        settings,
        run_id,
        flow_run_name(sop, run_id, prepared.params),
        tags=flow_run_tags(institution, sop),
        parameters=flow_run_parameters(institution, sop, run_id, prepared.params),
    )
    try:
        with write_session(settings.database_url) as s:
            run = SopRun(
                id=run_id,
                institution=institution,
                sop_version_id=prepared.pinned.version_id,
                sop_id=sop.id,
                sop_version=sop.version,
                sop_sha256=prepared.pinned.sha256,
                schema_version=sop.schema_version,
                params_json=ledger.canonical(prepared.params).decode(),
                product_json=ledger.canonical(prepared.product).decode() if prepared.product is not None else None,
                flow_run_id=flow_run_id,
                started_by=started_by,
                started_at=utcnow(),
                parent_run_id=parent_run_id,
                parent_step_id=parent_step_id,
            )
            ledger.append(s, run, actor=actor, action="run.start", reason=reason)
            set_run_status(s, run_id, "scheduled")
            if also is not None:
                also(s, run_id)
    except BaseException:
        release_flow_run(settings, flow_run_id, cancel=True)
        raise
    release_flow_run(settings, flow_run_id)
    return OpenedRun(run_id, flow_run_id)
