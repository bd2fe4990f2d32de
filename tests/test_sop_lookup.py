"""Stage 1: lookup tables (values chosen by the range a measured value falls in) and required_when,
in the model, the load-time checks and at submit (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.errors import SopInputError
from flows.sop import Catalog
from flows.sop.inputs import compute_fields
from flows.sop.lookup import lookup_value
from flows.sop.model import FieldSpec, HumanStepSpec, LookupRowSpec

REPO = Path(__file__).resolve().parent.parent
LIBRARY = Catalog(REPO / "sops", REPO / "templates")
INSTITUTIONS = ["demo_hospital", "shenjiang_hospital"]


def _row(**ends: object) -> LookupRowSpec:
    return LookupRowSpec.model_validate({**ends, "value": 1})


def test_lookup_row_ends_are_inclusive_or_exclusive_as_named() -> None:
    low_flow, high_flow = _row(**{"from": 0, "to": 6}), _row(above=6, to=60)

    assert [low_flow.holds(x) for x in (0, 6, 6.01)] == [True, True, False]
    assert [high_flow.holds(x) for x in (6, 6.01, 60, 60.5)] == [False, True, True, False]
    assert _row(**{"from": 10, "to": 10}).holds(10)


@pytest.mark.parametrize(
    ("ends", "message"),
    [
        ({"to": 6}, "give exactly one lower end: 'from' (inclusive) or 'above' (exclusive)"),
        ({"from": 0, "to": 6, "below": 7}, "give exactly one upper end: 'to' (inclusive) or 'below' (exclusive)"),
        ({"from": 6, "below": 6}, "the range is empty: its lower end 6 is not below its upper end 6"),
        ({"from": 7, "to": 6}, "the range is empty"),
        ({"from": "inf", "to": 6}, "finite number"),
    ],
)
def test_lookup_row_refuses_an_impossible_range(ends: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        LookupRowSpec.model_validate({**ends, "value": 1})


def test_lookup_row_value_is_a_number_or_text_not_a_boolean() -> None:
    with pytest.raises(ValidationError, match="not true/false"):
        LookupRowSpec.model_validate({"from": 0, "to": 1, "value": True})


def test_lookup_value_finds_the_one_row_holding_the_key() -> None:
    rows = (
        LookupRowSpec.model_validate({"from": 1, "below": 30, "value": 12}),
        LookupRowSpec.model_validate({"from": 30, "to": 300, "value": 8}),
    )

    assert [lookup_value(rows, w) for w in (1, 29.99, 30, 300, 301)] == [12, 12, 8, 8, None]


def test_lookup_needs_compute_naming_its_key() -> None:
    with pytest.raises(ValidationError, match="'lookup' needs 'compute'"):
        FieldSpec.model_validate({"type": "number", "lookup": [{"from": 0, "to": 1, "value": 1}]})


# Tocilizumab (Actemra/RoActemra label, CRS): 12 mg/kg under 30 kg, 8 mg/kg from 30 kg, at most 800 mg per dose.
@pytest.mark.parametrize("inst", INSTITUTIONS)
@pytest.mark.parametrize(
    ("weight", "per_kg", "dose"),
    [(1, 12, 12), (20, 12, 240), (29.9, 12, 358.8), (30, 8, 240), (62, 8, 496), (100, 8, 800), (300, 8, 800)],
)
def test_library_tocilizumab_dose_is_chosen_by_weight_band(
    inst: str, weight: float, per_kg: float, dose: float
) -> None:
    step = LIBRARY.get_sop(inst, "infusion_readiness").definition.step("tocilizumab")
    assert isinstance(step, HumanStepSpec)
    entered = {"doses_on_site": 2.0, "tocilizumab_lot": "TOC-881", "premedication_ordered": True}

    data = compute_fields(
        step.fields, entered, step_id="tocilizumab", context={"ld_record": {"weight_kg": float(weight)}}, where="t"
    )

    assert (data["dose_mg_per_kg"], data["dose_mg"]) == (per_kg, dose)


REASON = {
    "agreement": FieldSpec(type="choice", choices=("agree", "disagree")),
    "reason": FieldSpec(type="text", multiline=True, required_when="s.agreement == 'disagree'", label="Why"),
}


def test_required_when_makes_a_field_optional_unless_its_condition_holds() -> None:
    assert REASON["reason"].required is False
    assert compute_fields(REASON, {"agreement": "agree", "reason": None}, step_id="s", context={}, where="w") == {
        "agreement": "agree",
        "reason": None,
    }
    with pytest.raises(SopInputError) as info:
        compute_fields(REASON, {"agreement": "disagree", "reason": None}, step_id="s", context={}, where="w")
    assert info.value.problems == ["w: reason: a value is required when \"s.agreement == 'disagree'\" (Why)"]


def test_required_when_cannot_go_with_required_true() -> None:
    with pytest.raises(ValidationError, match="'required_when' cannot go with 'required: true'"):
        FieldSpec(type="text", required=True, required_when="x")


def _ice_sop(integer: bool) -> str:
    return (
        "schema_version: 1\nid: ice\ntitle: t\nversion: 1\nsteps:\n  - id: a\n    kind: record\n    role: qa\n"
        f"    fields:\n      ice: {{type: number, min: 0, max: 10, integer: {str(integer).lower()}}}\n"
        "      grade:\n        type: number\n        compute: a.ice\n        lookup:\n"
        "          - {from: 0, to: 2, value: 3}\n          - {from: 3, to: 6, value: 2}\n"
        "          - {from: 7, to: 9, value: 1}\n          - {from: 10, to: 10, value: 0}\n"
    )


def test_lookup_bands_of_whole_numbers_leave_no_gap_for_an_integer_key() -> None:
    from flows.sop.editing import validate_sop_text

    assert validate_sop_text(_ice_sop(integer=True)) == []
    gaps = validate_sop_text(_ice_sop(integer=False))
    assert [(p["line"], p["path"]) for p in gaps] == [
        (16, "steps[0].fields.grade.lookup[1].from"),
        (17, "steps[0].fields.grade.lookup[2].from"),
        (18, "steps[0].fields.grade.lookup[3].from"),
    ]
    assert gaps[0]["message"] == "step 'a': lookup: leaves a gap: values between 2 and 3 are in no row"
