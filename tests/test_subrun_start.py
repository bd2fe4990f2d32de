"""A sub-run opens the way every run opens (issue 10): ``flows.engine.opening`` makes the same start
checks for ``sopflow start`` and for a ``subrun`` step. The deliberate answer for a sub-run: every
check of the run itself applies (parameters, a product with nothing ``unconfirmed``, a time limit
for every deadline, the deviation id, quarantine); who may start does not (the system starts it on
behalf of the parent's starter). A refused sub-run does not fail the parent, which carries a
patient's dose: the parent's step is held, saying why, audited ``run.start.refused``, and the
worker's sweep resumes it once the check passes, here once the institution puts its catalogue right.

The institution of these tests is written into the engine's SOP folder (a real folder the worker
reads too), so a test can change its catalogue the way an administrator would.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from sqlmodel import select

from flows.config import Settings
from flows.errors import SopInputError
from flows.record.db import read_session
from flows.record.tables import AuditEvent, SopRun, utcnow
from flows.services import runs as runs_service
from flows.services import signing as signing_service
from flows.services.guard import Officer
from flows.services.versions import establish
from tests.fixtures_engine import PASSWORD, wait_for
from tests.seed import seed_training, seed_user
from tests.waiting import eventually

pytestmark = pytest.mark.slow

INST = "subrun_hospital"
HEADER = "# Owner: sopflow tests · Approval: none (test fixture) · Effective: n/a\n"
PRODUCTS = {
    "ready": {"name": "A product the catalogue has confirmed", "mah": "Test", "thaw_to_infusion_max_min": 30},
    "pending": {
        "name": "A product whose storage limit is not confirmed against its label",
        "mah": "Test",
        "storage_max_c": -150,
        "thaw_to_infusion_max_min": 30,
        "unconfirmed": ["storage_max_c"],
    },
    "noclock": {"name": "A product whose thaw limit the catalogue does not give", "mah": "Test"},
}
FILES = {
    "institution.yaml": """
        schema_version: 1
        id: subrun_hospital
        name: Sub-run Start Test Hospital
        timezone: Asia/Shanghai
        roles:
          cell_lab: {label: Cell-lab technician}
          qa: {label: QA officer}
        """,
    "thaw_record.yaml": """
        schema_version: 1
        id: thaw_record
        title: A dose thawed, within the product's time limit
        version: 1
        params:
          product: {type: product}
          coi: {type: text}
        steps:
          - id: thaw
            kind: record
            role: cell_lab
            fields:
              thaw_end: {type: datetime}
          - id: infused
            kind: record
            role: cell_lab
            fields:
              infusion_end: {type: datetime}
        deadlines:
          - id: thaw_limit
            from: thaw.thaw_end
            to: infused.infusion_end
            within_min: "product.thaw_to_infusion_max_min"
        """,
    **{
        f"hand_over_{product}.yaml": f"""
        schema_version: 1
        id: hand_over_{product}
        title: A hand-over whose sub-run records the thaw of product {product}
        version: 1
        params:
          coi: {{type: text}}
        steps:
          - id: dose
            kind: subrun
            sop: thaw_record
            params: {{product: "'{product}'", coi: "params.coi"}}
        """
        for product in PRODUCTS
    },
}
SOPS = ["thaw_record", *(f"hand_over_{p}" for p in PRODUCTS)]


def _write_products(folder: Path, products: dict[str, dict[str, object]]) -> None:
    text = yaml.safe_dump({"schema_version": 1, "products": products}, allow_unicode=True, sort_keys=False)
    (folder / "products.yaml").write_text(HEADER + text, encoding="utf-8")


@pytest.fixture(name="hospital", scope="module")
def hospital_fixture(engine: Settings) -> Path:
    folder = engine.sops_dir / INST
    folder.mkdir()
    for name, text in FILES.items():
        (folder / name).write_text(HEADER + textwrap.dedent(text).lstrip(), encoding="utf-8")
    _write_products(folder, PRODUCTS)
    seed_user(engine, "sr_qa", "Sub Run QA", PASSWORD, [(INST, "qa")])
    seed_user(engine, "sr_tech", "Sub Run Tech", PASSWORD, [(INST, "cell_lab")])
    establish(engine, INST, Officer("sr_qa", PASSWORD))
    for sop in SOPS:
        seed_training(engine, "sr_tech", INST, sop, 1)
    return folder


def _held(engine: Settings, run_id: str, step: str) -> dict:
    def held() -> dict | None:
        rec = runs_service.quality_record(engine, run_id)
        states = {s["id"]: s["status"] for s in rec["steps"]}
        return rec if states.get(step) == "held" else None

    return eventually(held, f"step {step} of run {run_id} was never held")


def _children(engine: Settings, run_id: str) -> list[SopRun]:
    with read_session(engine.database_url) as s:
        return list(s.exec(select(SopRun).where(SopRun.parent_run_id == run_id)))


def _refusals(engine: Settings, run_id: str) -> list[AuditEvent]:
    with read_session(engine.database_url) as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.action == "run.start.refused"))
        return [e for e in events if run_id in e.payload_json]


def _finish(engine: Settings, parent: str) -> None:
    """The sub-run starts once its check passes; signing it lets the parent complete."""
    child = eventually(lambda: _children(engine, parent), f"run {parent} started no sub-run")[0].id
    wait_for(engine, child, step="thaw")
    signing_service.submit_step(engine, child, "thaw", "sr_tech", PASSWORD, {"thaw_end": utcnow().isoformat()})
    wait_for(engine, child, step="infused")
    signing_service.submit_step(engine, child, "infused", "sr_tech", PASSWORD, {"infusion_end": utcnow().isoformat()})
    rec = wait_for(engine, parent, statuses=("completed", "rejected", "stopped", "failed"))
    assert rec["run"]["status"] == "completed"


def test_subrun_start_the_same_checks_refuse_a_run_started_directly(engine: Settings, hospital: Path):
    params = {"coi": "COI-DIRECT-1"}
    for product, problem in (("pending", "not confirmed against its label"), ("noclock", "no time limit for this run")):
        with pytest.raises(SopInputError, match=problem):
            runs_service.start_run(engine, INST, "thaw_record", {**params, "product": product}, "sr_tech", PASSWORD)


@pytest.mark.parametrize(
    ("product", "problem", "fix"),
    [
        (
            "pending",
            "thaw_record params.product: product 'pending' has values not confirmed against its label: storage_max_c",
            {"unconfirmed": []},
        ),
        (
            "noclock",
            "thaw_record deadlines.thaw_limit: no time limit for this run",
            {"thaw_to_infusion_max_min": 45},
        ),
    ],
)
def test_subrun_start_refused_holds_the_parent_then_goes_on_once_the_catalogue_is_right(
    engine: Settings, hospital: Path, product: str, problem: str, fix: dict[str, object]
):
    parent = runs_service.start_run(
        engine, INST, f"hand_over_{product}", {"coi": f"COI-{product}-1"}, "sr_tech", PASSWORD
    )

    rec = _held(engine, parent.run_id, "dose")
    assert f"sub-run thaw_record cannot start: {problem}" in rec["run"]["status_detail"]
    assert rec["run"]["status"] == "waiting"
    assert _children(engine, parent.run_id) == []  # nothing was opened
    [refused] = _refusals(engine, parent.run_id)
    assert (refused.actor, refused.object_id) == ("system", "thaw_record")
    assert problem in (refused.reason or "")

    _write_products(hospital, {**PRODUCTS, product: {**PRODUCTS[product], **fix}})  # an administrator puts it right
    _finish(engine, parent.run_id)
    assert len(_refusals(engine, parent.run_id)) == 1  # the sweep re-checked without writing a refusal each time


def test_subrun_start_on_a_confirmed_product_opens_at_once(engine: Settings, hospital: Path):
    parent = runs_service.start_run(engine, INST, "hand_over_ready", {"coi": "COI-ready-1"}, "sr_tech", PASSWORD)
    _finish(engine, parent.run_id)
    assert _refusals(engine, parent.run_id) == []
