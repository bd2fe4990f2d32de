"""Stage 1: run parameters and step fields checked against their FieldSpecs before any step runs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from flows.errors import SopInputError
from flows.sop import Catalog, coerce_values
from flows.sop.model import FieldSpec, HumanStepSpec

TESTS = Path(__file__).parent
CATALOG = Catalog(TESTS / "sops" / "valid" / "sops", TESTS / "sops" / "valid" / "templates")
SOP = CATALOG.get_sop("test_hospital", "every_kind").definition
PRODUCTS = CATALOG.products("test_hospital")


def _fields(step_id: str) -> dict[str, FieldSpec]:
    step = SOP.step(step_id)
    assert isinstance(step, HumanStepSpec)
    return step.fields


ARRIVAL = _fields("arrival")
IDENTITY = _fields("identity")


def _problems(
    fields: Mapping[str, FieldSpec],
    raw: Mapping[str, object],
    where: str = "every_kind params",
) -> list[str]:
    with pytest.raises(SopInputError) as info:
        coerce_values(fields, raw, where=where, products=PRODUCTS)
    return info.value.problems


def test_coerce_values_converts_command_line_strings() -> None:
    raw = {
        "arrived_at": "2026-11-03T09:30+08:00",
        "seal_intact": "yes",
        "logger_max_c": "-160",
        "items": "2",
    }

    values = coerce_values(ARRIVAL, raw, where="every_kind step 'arrival'")

    assert values == {
        "arrived_at": "2026-11-03T01:30:00+00:00",
        "seal_intact": True,
        "logger_max_c": -160.0,
        "items": 2.0,
    }
    assert json.loads(json.dumps(values)) == values


def test_coerce_values_accepts_typed_json_values() -> None:
    raw = {
        "arrived_at": "2026-11-03T01:30:00Z",
        "seal_intact": False,
        "logger_max_c": -160,
        "items": 0,
    }

    values = coerce_values(ARRIVAL, raw, where="every_kind step 'arrival'")

    assert values["seal_intact"] is False
    assert values["arrived_at"] == "2026-11-03T01:30:00+00:00"


def test_coerce_values_params_with_product_and_optional_left_out() -> None:
    raw = {"product": "tecartus", "coi": "COI-123456", "patient_id": "P1234"}

    values = coerce_values(SOP.params, raw, where="every_kind params", products=PRODUCTS)

    assert values == {
        "product": "tecartus",
        "coi": "COI-123456",
        "patient_id": "P1234",
        "note": None,
    }


def test_coerce_values_number_below_minimum_states_rule_with_unit() -> None:
    raw = {
        "arrived_at": "2026-11-03T09:30+08:00",
        "seal_intact": "true",
        "logger_max_c": "-250",
        "items": "1",
    }

    problems = _problems(ARRIVAL, raw, where="every_kind step 'arrival'")

    assert problems == ["every_kind step 'arrival': logger_max_c: -250 °C is below the minimum -200 °C"]


def test_coerce_values_collects_every_problem() -> None:
    raw = {
        "arrived_at": "2026-11-03T09:30",
        "seal_intact": "maybe",
        "logger_max_c": "cold",
        "itens": 1,
    }

    problems = _problems(ARRIVAL, raw, where="every_kind step 'arrival'")

    assert problems == [
        "every_kind step 'arrival': unknown field 'itens'. Did you mean 'items'?",
        "every_kind step 'arrival': arrived_at: '2026-11-03T09:30' has no time zone; "
        "add an offset like +08:00 (e.g. 2026-11-03T09:30+08:00)",
        "every_kind step 'arrival': seal_intact: 'maybe' is not a yes/no value; use true/false, yes/no or 1/0",
        "every_kind step 'arrival': logger_max_c: 'cold' is not a number: use ASCII digits with an optional "
        "sign, one decimal point and an optional exponent (e.g. -160, 37.5, 1.2e3)",
        "every_kind step 'arrival': items: a value is required",
    ]


def test_coerce_values_never_echoes_phi() -> None:
    raw = {"product": "tecartus", "coi": "COI-123456", "patient_id": "zhang san 1961"}

    problems = _problems(SOP.params, raw)

    assert problems == [
        "every_kind params: patient_id: the value does not match the required pattern '^[A-Z0-9]{4,20}$'"
    ]
    assert "zhang" not in "\n".join(problems)


def test_coerce_values_echoes_non_phi_pattern_mismatch() -> None:
    problems = _problems(SOP.params, {"product": "tecartus", "coi": "abc", "patient_id": "P1234"})

    assert problems == ["every_kind params: coi: 'abc' does not match the required pattern '^[A-Z0-9-]{6,40}$'"]


def test_coerce_values_choice_and_product_suggest_close_match() -> None:
    choice = _problems(IDENTITY, {"documents": "complet"}, where="every_kind step 'identity'")
    product = _problems(SOP.params, {"product": "tecartis", "coi": "COI-123456", "patient_id": "P1234"})

    assert choice == [
        "every_kind step 'identity': documents: 'complet' is not one of the choices. Did you mean 'complete'?"
    ]
    assert product == [
        "every_kind params: product: 'tecartis' is not a product in the catalogue. Did you mean 'tecartus'?"
    ]


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (
            FieldSpec(type="text", max_length=3),
            "abcd",
            "x: is 4 characters long; the maximum is 3",
        ),
        (FieldSpec(type="text"), 12, "x: expected text, got a number"),
        (
            FieldSpec(type="number", max=40, unit="h"),
            41,
            "x: 41 h is above the maximum 40 h",
        ),
        (FieldSpec(type="number"), True, "x: expected a number, got a boolean"),
        (FieldSpec(type="number"), "nan", "x: 'nan' is not a finite number"),
        (
            FieldSpec(type="bool"),
            2,
            "x: 2 is not a yes/no value; use true/false, yes/no or 1/0",
        ),
        (
            FieldSpec(type="datetime"),
            "3 Nov",
            "x: '3 Nov' is not an ISO 8601 date and time like 2026-11-03T09:30+08:00",
        ),
        (
            FieldSpec(type="choice", choices=("a", "b")),
            "zzz",
            "x: 'zzz' is not one of the choices. Expected one of: 'a', 'b'.",
        ),
        (
            FieldSpec(type="number", min=0, phi=True),
            -5,
            "x: the value is below the minimum 0",
        ),
    ],
    ids=[
        "max-length",
        "text-type",
        "max",
        "bool-as-number",
        "nan",
        "bool",
        "datetime",
        "choice",
        "phi-number",
    ],
)
def test_coerce_values_rejects_value_with_rule(spec: FieldSpec, value: object, message: str) -> None:
    assert _problems({"x": spec}, {"x": value}, where="s") == [f"s: {message}"]


def test_coerce_values_product_without_catalogue() -> None:
    with pytest.raises(SopInputError, match="the institution's catalogue has no products"):
        coerce_values({"p": FieldSpec(type="product")}, {"p": "tecartus"}, where="s")
