"""Stage 1: the SOP-language additions (identifier formats, computed fields, ``when:``,
deadlines, ``repeat:``) in the model, the load-time checks and the input checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.errors import SopInputError
from flows.sop import Catalog, coerce_values
from flows.sop.identifiers import MOD37_2_CHARSET, din_check_character, normalize_din
from flows.sop.inputs import compute_fields
from flows.sop.model import FieldSpec, HumanStepSpec, ProductSpec

TESTS = Path(__file__).parent
LANG = Catalog(TESTS / "sops" / "engine", TESTS / "sops" / "valid" / "templates")
PRODUCTS = LANG.products("lang_hospital")


# --------------------------------------------------------------------------- identifier formats


def _mod37_2_valid(full: str) -> bool:
    """ISO/IEC 7064 pure system, straight from its definition: with the check character at
    position 1 counted from the right, sum(value_i * 2**(i-1)) over all 14 characters is 1 mod 37."""
    values = [MOD37_2_CHARSET.index(c) for c in reversed(full)]
    return sum(v * 2**i for i, v in enumerate(values)) % 37 == 1


def test_din_check_character_matches_published_example() -> None:
    """JPAC Red Book, Annex 2 (ISBT 128 check character calculation): G123 498 654 321 -> H (checksum 17)."""
    assert din_check_character("G123498654321") == "H"
    assert normalize_din("G1234 98 654321 H") == ("G123498654321H", None)


@pytest.mark.parametrize(
    "din", ["A999926123456", "W123425000001", "Z0Z0Z99999999", "000000000000" + "0", "G12349865432A"[:12] + "7"]
)
def test_din_check_character_satisfies_iso_7064_definition(din: str) -> None:
    check = din_check_character(din)

    assert _mod37_2_valid(din + check)
    assert sum(_mod37_2_valid(din + c) for c in MOD37_2_CHARSET) == 1  # exactly one character fits


def test_din_wrong_check_character_is_refused_without_giving_the_right_one() -> None:
    """Issue 15: the message used to name the expected character, so a misread DIN could be completed."""
    din, problem = normalize_din("g1234 98 654321 x")

    assert din == "G123498654321X"
    assert problem == (
        "check character 'X' does not match DIN G123498654321 (ISO 7064 Mod 37-2): "
        "a character was misread or mistyped; read the label again"
    )
    assert "'H'" not in problem


@pytest.mark.parametrize("value", ["G1234 98 65432 H", "G1234 9A 654321 H", "G12-4 98 654321 H", ""])
def test_din_malformed_is_refused(value: str) -> None:
    assert "is not an ISBT 128 donation identification number" in (normalize_din(value)[1] or "")


DIN = FieldSpec(type="text", format="isbt128_din", label="Donation identification number")
COI = FieldSpec(type="text", format="coi")
PARAMS = {"product": FieldSpec(type="product"), "coi": COI}


def test_coerce_din_field_stores_it_without_spaces_and_names_field_on_error() -> None:
    assert coerce_values({"din": DIN}, {"din": "G1234 98 654321 H"}, where="s step 'x'") == {"din": "G123498654321H"}
    with pytest.raises(SopInputError) as info:
        coerce_values({"din": DIN}, {"din": "G1234 98 654321 X"}, where="s step 'x'")
    assert info.value.problems == [
        "s step 'x': din: 'G123498654321X' check character 'X' does not match DIN G123498654321 "
        "(ISO 7064 Mod 37-2): a character was misread or mistyped; read the label again"
    ]


def test_coerce_coi_param_matches_the_products_pattern() -> None:
    values = coerce_values(
        PARAMS, {"product": "tecartus", "coi": "KT-2026-000117"}, where="p params", products=PRODUCTS
    )
    assert values["coi"] == "KT-2026-000117"
    with pytest.raises(SopInputError) as info:
        coerce_values(PARAMS, {"product": "tecartus", "coi": "KT-26-117"}, where="p params", products=PRODUCTS)
    assert info.value.problems == [
        "p params: coi: 'KT-26-117' is not a chain-of-identity id of product 'tecartus': "
        "it must match 'KT-[0-9]{4}-[0-9]{6}' (e.g. 'KT-2026-000117')"
    ]


def test_coerce_coi_without_pattern_for_the_product_is_refused_naming_product_and_key() -> None:
    with pytest.raises(SopInputError) as info:
        coerce_values(PARAMS, {"product": "abecma", "coi": "ANY-1"}, where="p params", products=PRODUCTS)
    [problem] = info.value.problems
    assert "product 'abecma' has no 'coi_pattern'" in problem


def test_coerce_coi_step_field_uses_the_runs_product() -> None:
    run_product = ("tecartus", PRODUCTS["tecartus"])
    assert coerce_values({"c": COI}, {"c": "KT-2026-000001"}, where="w", product=run_product) == {"c": "KT-2026-000001"}
    with pytest.raises(SopInputError, match="'KT-1' is not a chain-of-identity id of product 'tecartus'"):
        coerce_values({"c": COI}, {"c": "KT-1"}, where="w", product=run_product)


def test_coerce_coi_after_a_refused_product_reports_only_the_product() -> None:
    with pytest.raises(SopInputError) as info:
        coerce_values(PARAMS, {"product": "tecartsu", "coi": "KT-1"}, where="p params", products=PRODUCTS)
    [problem] = info.value.problems
    assert "params: product:" in problem


def test_product_coi_example_must_match_its_pattern() -> None:
    with pytest.raises(ValueError, match="'coi_example' 'KT-1' does not match 'coi_pattern'"):
        ProductSpec(name="x", mah="y", coi_pattern="KT-[0-9]{4}", coi_example="KT-1")
    with pytest.raises(ValueError, match="'format' applies to type 'text', not 'number'"):
        FieldSpec(type="number", format="isbt128_din")


# --------------------------------------------------------------------------- computed fields

COMPUTE = LANG.get_sop("lang_hospital", "lang_compute").definition
ASSESS = COMPUTE.step("assess")


def _assess(weight: float, fever: bool, hypotension: str, hypoxia: str) -> dict[str, object]:
    assert isinstance(ASSESS, HumanStepSpec)
    entered = coerce_values(
        ASSESS.fields,
        {"weight_kg": weight, "fever": fever, "hypotension": hypotension, "hypoxia": hypoxia},
        where="lang_compute step 'assess'",
    )
    assert entered == {"weight_kg": float(weight), "fever": fever, "hypotension": hypotension, "hypoxia": hypoxia}
    return compute_fields(
        ASSESS.fields,
        entered,
        step_id="assess",
        context={"params": {}, "product": None},
        where="lang_compute step 'assess'",
    )


@pytest.mark.parametrize(
    ("weight", "fever", "hypotension", "hypoxia", "grade", "dose"),
    [
        (70, False, "none", "none", 0, 560),  # no fever: no CRS; 8 mg/kg
        (70, True, "none", "none", 1, 560),  # fever only: grade 1
        (120, True, "no_pressors", "high_flow", 3, 800),  # worse of the two decides; 8 mg/kg capped at 800 mg
        (100, True, "multiple_pressors", "low_flow", 4, 800),  # exactly 800 mg at 100 kg
        (29.5, True, "one_pressor", "positive_pressure", 4, 354),  # < 30 kg: 12 mg/kg
        (30, True, "none", "low_flow", 2, 240),  # 30 kg: 8 mg/kg
    ],
)
def test_computed_crs_grade_and_tocilizumab_dose(weight, fever, hypotension, hypoxia, grade, dose) -> None:
    values = _assess(weight, fever, hypotension, hypoxia)

    assert values["crs_grade"] == grade
    assert values["toci_mg"] == pytest.approx(dose)


def test_computed_field_cannot_be_entered() -> None:
    assert isinstance(ASSESS, HumanStepSpec)
    with pytest.raises(SopInputError) as info:
        coerce_values(
            ASSESS.fields,
            {"weight_kg": 70, "fever": True, "hypotension": "none", "hypoxia": "none", "toci_mg": 100},
            where="w",
        )
    assert info.value.problems == [
        "w: toci_mg: is computed ('([assess.weight_kg * 8, 800] | min) if "
        "assess.weight_kg >= 30 else assess.weight_kg * 12'); it cannot be entered"
    ]


def test_computed_value_breaking_its_rule_is_refused_naming_the_field() -> None:
    fields = {
        "n": FieldSpec(type="number"),
        "twice": FieldSpec(type="number", max=10, compute="s.n * 2"),
        "label": FieldSpec(type="choice", choices=("low", "high"), compute="'mid'"),
    }
    with pytest.raises(SopInputError) as info:
        compute_fields(fields, {"n": 6.0}, step_id="s", context={}, where="w")
    assert info.value.problems == [
        "w: twice: the computed value 12 is above the maximum 10",
        "w: label: the computed value 'mid' is not one of the choices. Expected one of: 'low', 'high'.",
    ]


def test_computed_field_that_cannot_be_evaluated_says_why() -> None:
    fields = {"n": FieldSpec(type="number", required=False), "twice": FieldSpec(type="number", compute="s.n * 2")}
    with pytest.raises(SopInputError, match=r"w: twice: could not be computed: compute 's.n \* 2' failed"):
        compute_fields(fields, {"n": None}, step_id="s", context={}, where="w")


# --------------------------------------------------------------------------- the JSON Schema keeps up


@pytest.mark.parametrize(
    "path", sorted((TESTS / "sops" / "engine" / "lang_hospital").glob("lang_*.yaml")), ids=lambda p: p.stem
)
def test_sop_json_schema_accepts_every_language_addition(path: Path) -> None:
    import jsonschema
    import yaml

    from flows.sop.schema import sop_json_schema

    LANG.get_sop("lang_hospital", path.stem)  # loads and checks
    jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), sop_json_schema())


def test_sop_json_schema_refuses_a_misspelt_deadline_key() -> None:
    import jsonschema

    from flows.sop.schema import sop_json_schema

    doc = {
        "schema_version": 1,
        "id": "x",
        "title": "x",
        "version": 1,
        "steps": [{"id": "a", "kind": "record", "role": "qa", "fields": {}}],
        "deadlines": [{"id": "d", "form": "a", "to": "a", "within": "30m"}],
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, sop_json_schema())


def test_deadline_text_reads_as_time_left_or_result() -> None:
    from flows.cli.render import deadline_text

    base = {"due_at": "2026-11-25T10:30:00+00:00", "limit_seconds": 1800.0, "problem": None}
    assert deadline_text({**base, "state": "running", "seconds_left": 725.0}) == "12m left (due 2026-11-25 10:30 UTC)"
    assert (
        deadline_text({**base, "state": "overdue", "seconds_left": -3900.0})
        == "overdue by 1h 5m (due 2026-11-25 10:30 UTC)"
    )
    assert deadline_text({**base, "state": "breached", "elapsed_seconds": 2460.0}) == "breached: 41m of 30m"
    assert deadline_text({**base, "state": "invalid", "problem": "no limit"}) == "invalid: no limit"
