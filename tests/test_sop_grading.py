"""The library's toxicity SOPs grade CRS and ICANS as the ASTCT 2019 consensus does (issue 15).

Source of every case: Lee DW, Santomasso BD, Locke FL, et al. ASTCT consensus grading for cytokine
release syndrome and neurologic toxicity associated with immune effector cells. Biol Blood Marrow
Transplant 2019;25(4):625-638 (doi:10.1016/j.bbmt.2018.12.758): the table "ASTCT CRS Consensus
Grading" and its footnotes (fever >= 38 °C; after antipyretic or anticytokine therapy fever is no
longer required; the grade is the more severe of hypotension and hypoxia; low flow <= 6 L/min,
high flow > 6 L/min; the worked example 39.5 °C + one vasopressor + low-flow cannula = grade 3),
the ICE score and the table "ASTCT ICANS Consensus Grading for Adults" with its footnotes (the
grade is the most severe domain; ICE 3 with a generalised seizure = grade 3; ICE 0 awake with
global aphasia = grade 3, ICE 0 unarousable = grade 4). Boundaries are taken from those tables,
not from the SOPs' expressions.

Each case runs both institutions' own SOP text: the assessment's values go through the input
checks (coerce_values) and its compute:/lookup: fields (compute_fields); the physician's review,
the severe_toxicity check and the ae_report condition are evaluated from the YAML too.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from flows.errors import SopInputError
from flows.sop import Catalog, coerce_values
from flows.sop.expressions import evaluate_check
from flows.sop.inputs import compute_fields
from flows.sop.model import CheckStepSpec, HumanStepSpec, SopDefinition

REPO = Path(__file__).resolve().parent.parent
LIBRARY = Catalog(REPO / "sops", REPO / "templates")
INSTITUTIONS = ["demo_hospital", "shenjiang_hospital"]

NORMAL = {
    "assessed_at": "2026-11-03T09:30+08:00",
    "temperature_c": "37.0",
    "fever_masked": "no",
    "hypotension": "no",
    "vasopressors": "0",
    "vasopressin": "no",
    "oxygen_device": "none",
    "oxygen_flow_l_min": "0",
    "ice_score": "10",
    "consciousness": "alert",
    "seizure": "none",
    "deep_focal_motor_weakness": "no",
    "cerebral_oedema_on_imaging": "not_imaged",
    "posturing": "no",
    "cranial_nerve_vi_palsy": "no",
    "papilloedema": "no",
    "cushings_triad": "no",
    "monitoring_complete": "yes",
}
FEVER = {"temperature_c": "38.0"}


@functools.cache
def _sop(inst: str) -> SopDefinition:
    return LIBRARY.get_sop(inst, "toxicity_monitoring").definition


def _fields(inst: str, step_id: str) -> dict[str, Any]:
    step = _sop(inst).step(step_id)
    assert isinstance(step, HumanStepSpec)
    return dict(step.fields)


def _assess(inst: str, **changes: str) -> dict[str, Any]:
    fields = _fields(inst, "assessment")
    entered = coerce_values(fields, {**NORMAL, **changes}, where=f"{inst} assessment")
    return compute_fields(fields, entered, step_id="assessment", context={}, where=f"{inst} assessment")


# --------------------------------------------------------------------------- CRS

CRS = [
    # (changes to a normal assessment, grade); the consensus's words in the id
    ({"temperature_c": "37.9"}, 0, "37.9C-is-not-fever"),
    ({"temperature_c": "37.9", "hypotension": "yes", "vasopressors": "1"}, 0, "no-fever-no-crs"),
    (FEVER, 1, "38.0C-fever-only"),
    ({**FEVER, "hypotension": "yes"}, 2, "hypotension-not-requiring-vasopressors"),
    ({**FEVER, "oxygen_device": "nasal_cannula", "oxygen_flow_l_min": "6"}, 2, "low-flow-cannula-6-l-min"),
    ({**FEVER, "oxygen_device": "nasal_cannula", "oxygen_flow_l_min": "1"}, 2, "low-flow-cannula-1-l-min"),
    ({**FEVER, "oxygen_device": "blow_by", "oxygen_flow_l_min": "4"}, 2, "blow-by"),
    ({**FEVER, "oxygen_device": "nasal_cannula", "oxygen_flow_l_min": "6.5"}, 3, "high-flow-cannula-over-6"),
    ({**FEVER, "oxygen_device": "nasal_cannula", "oxygen_flow_l_min": "40"}, 3, "high-flow-cannula-40"),
    ({**FEVER, "oxygen_device": "facemask", "oxygen_flow_l_min": "5"}, 3, "facemask"),
    ({**FEVER, "oxygen_device": "non_rebreather_mask", "oxygen_flow_l_min": "15"}, 3, "non-rebreather"),
    ({**FEVER, "oxygen_device": "venturi_mask", "oxygen_flow_l_min": "8"}, 3, "venturi"),
    ({**FEVER, "hypotension": "yes", "vasopressors": "1"}, 3, "one-vasopressor"),
    ({**FEVER, "hypotension": "yes", "vasopressors": "1", "vasopressin": "yes"}, 3, "one-vasopressor-with-vasopressin"),
    ({**FEVER, "hypotension": "yes", "vasopressin": "yes"}, 3, "vasopressin-alone"),
    ({**FEVER, "hypotension": "yes", "vasopressors": "2"}, 4, "multiple-vasopressors"),
    ({**FEVER, "hypotension": "yes", "vasopressors": "2", "vasopressin": "yes"}, 4, "multiple-with-vasopressin"),
    ({**FEVER, "oxygen_device": "cpap", "oxygen_flow_l_min": "10"}, 4, "cpap"),
    ({**FEVER, "oxygen_device": "bipap", "oxygen_flow_l_min": "10"}, 4, "bipap"),
    ({**FEVER, "oxygen_device": "mechanical_ventilation", "oxygen_flow_l_min": "10"}, 4, "intubation-ventilation"),
    (
        {
            "temperature_c": "39.5",
            "hypotension": "yes",
            "vasopressors": "1",
            "oxygen_device": "nasal_cannula",
            "oxygen_flow_l_min": "2",
        },
        3,
        "footnote-39.5C-one-vasopressor-low-flow",
    ),
    ({**FEVER, "hypotension": "yes", "oxygen_device": "cpap", "oxygen_flow_l_min": "8"}, 4, "more-severe-of-the-two"),
    ({"temperature_c": "37.0", "fever_masked": "yes", "hypotension": "yes"}, 2, "masked-fever-hypotension"),
    (
        {
            "temperature_c": "36.8",
            "fever_masked": "yes",
            "oxygen_device": "non_rebreather_mask",
            "oxygen_flow_l_min": "12",
        },
        3,
        "masked-fever-non-rebreather",
    ),
    ({"temperature_c": "37.0", "fever_masked": "yes"}, 0, "masked-fever-nothing-to-grade"),
]


@pytest.mark.parametrize("inst", INSTITUTIONS)
@pytest.mark.parametrize(("changes", "grade"), [c[:2] for c in CRS], ids=[c[2] for c in CRS])
def test_toxicity_crs_grade_follows_the_astct_consensus(inst: str, changes: dict[str, str], grade: int) -> None:
    assert _assess(inst, **changes)["crs_grade"] == grade


@pytest.mark.parametrize("inst", INSTITUTIONS)
@pytest.mark.parametrize(
    ("flow", "cls"), [("0", "low_flow"), ("6", "low_flow"), ("6.01", "high_flow"), ("80", "high_flow")]
)
def test_toxicity_nasal_cannula_flow_class_splits_at_6_l_min(inst: str, flow: str, cls: str) -> None:
    assert _assess(inst, oxygen_device="nasal_cannula", oxygen_flow_l_min=flow)["nasal_cannula_flow"] == cls


# --------------------------------------------------------------------------- ICANS

ICANS = [
    ({}, 0, "ice-10-no-impairment"),
    ({"ice_score": "9"}, 1, "ice-9"),
    ({"ice_score": "7"}, 1, "ice-7"),
    ({"ice_score": "6"}, 2, "ice-6"),
    ({"ice_score": "3"}, 2, "ice-3"),
    ({"ice_score": "2"}, 3, "ice-2"),
    ({"ice_score": "0"}, 3, "ice-0-awake-global-aphasia"),
    ({"ice_score": "0", "consciousness": "unarousable"}, 4, "ice-0-unarousable"),
    ({"consciousness": "awakens_spontaneously"}, 1, "awakens-spontaneously"),
    ({"consciousness": "awakens_to_voice"}, 2, "awakens-to-voice"),
    ({"consciousness": "awakens_only_to_touch"}, 3, "awakens-only-to-tactile-stimulus"),
    ({"consciousness": "unarousable"}, 4, "unarousable-vigorous-stimuli-stupor-coma"),
    ({"seizure": "clinical_resolved_rapidly"}, 3, "clinical-seizure-resolves-rapidly"),
    ({"seizure": "nonconvulsive_on_eeg_resolved_with_intervention"}, 3, "eeg-seizure-resolves-with-intervention"),
    ({"seizure": "prolonged_over_5_min"}, 4, "prolonged-seizure-over-5-min"),
    ({"seizure": "repetitive_without_return_to_baseline"}, 4, "repetitive-without-return-to-baseline"),
    ({"deep_focal_motor_weakness": "yes"}, 4, "hemiparesis-or-paraparesis"),
    ({"cerebral_oedema_on_imaging": "none"}, 0, "imaging-without-oedema"),
    ({"cerebral_oedema_on_imaging": "focal_or_local"}, 3, "focal-oedema"),
    ({"cerebral_oedema_on_imaging": "diffuse"}, 4, "diffuse-oedema"),
    ({"posturing": "yes"}, 4, "decerebrate-or-decorticate-posturing"),
    ({"cranial_nerve_vi_palsy": "yes"}, 4, "cranial-nerve-vi-palsy"),
    ({"papilloedema": "yes"}, 4, "papilloedema"),
    ({"cushings_triad": "yes"}, 4, "cushings-triad"),
    ({"ice_score": "3", "seizure": "clinical_resolved_rapidly"}, 3, "footnote-ice-3-generalised-seizure"),
    ({"ice_score": "8", "cerebral_oedema_on_imaging": "focal_or_local"}, 3, "baseline-bug-ice-8-with-focal-oedema"),
    ({"ice_score": "8", "deep_focal_motor_weakness": "yes"}, 4, "baseline-bug-ice-8-with-hemiparesis"),
]


@pytest.mark.parametrize("inst", INSTITUTIONS)
@pytest.mark.parametrize(("changes", "grade"), [c[:2] for c in ICANS], ids=[c[2] for c in ICANS])
def test_toxicity_icans_grade_follows_the_astct_consensus(inst: str, changes: dict[str, str], grade: int) -> None:
    assert _assess(inst, **changes)["icans_grade"] == grade


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_toxicity_ice_score_takes_whole_points_only(inst: str) -> None:
    with pytest.raises(SopInputError, match=r"ice_score: 6\.5 .*is not a whole number"):
        _assess(inst, ice_score="6.5")


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_toxicity_grades_cannot_be_entered(inst: str) -> None:
    with pytest.raises(SopInputError, match="crs_grade: is computed"):
        coerce_values(_fields(inst, "assessment"), {**NORMAL, "crs_grade": "0"}, where="a")


# --------------------------------------------------------------------------- the physician's confirmation


def _review(inst: str, assessments: list[dict[str, Any]], **entered: str) -> dict[str, Any]:
    fields = _fields(inst, "review")
    raw = {"tocilizumab_mg": "0", **entered}
    values = coerce_values(fields, raw, where=f"{inst} review")
    return compute_fields(fields, values, step_id="review", context={"assessment_all": assessments}, where="review")


def _severe(inst: str, review: dict[str, Any]) -> tuple[bool, bool]:
    """(the severe_toxicity check passes, the ae_report step runs), from the SOP's own expressions."""
    sop = _sop(inst)
    check = sop.step("severe_toxicity")
    assert isinstance(check, CheckStepSpec)
    report = sop.step("ae_report").when
    assert report is not None
    context = {"review": review}
    return evaluate_check(check.expect, context), evaluate_check(report, context)


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_toxicity_review_agreeing_confirms_the_worst_computed_grades(inst: str) -> None:
    days = [_assess(inst, **FEVER), _assess(inst, **FEVER, hypotension="yes", vasopressors="1"), _assess(inst)]

    review = _review(inst, days, agreement="agree")

    assert (review["worst_crs_grade"], review["crs_grade"], review["icans_grade"]) == (3, 3, 0)
    assert _severe(inst, review) == (False, True)  # a deviation opens and the AE report is required


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_toxicity_review_disagreeing_downward_is_what_later_steps_read(inst: str) -> None:
    days = [_assess(inst, **FEVER, oxygen_device="nasal_cannula", oxygen_flow_l_min="7")]

    review = _review(
        inst,
        days,
        agreement="disagree",
        physician_crs_grade="2",
        physician_icans_grade="0",
        disagreement_reason="Flow meter read 7 L/min;\nthe cannula ran at 5 L/min (checked at the bedside).",
    )

    assert (review["worst_crs_grade"], review["crs_grade"]) == (3, 2)
    assert _severe(inst, review) == (True, False)


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_toxicity_review_disagreeing_upward_opens_the_deviation(inst: str) -> None:
    """The physician sees motor weakness the nurse did not record: their grade 4 decides."""
    review = _review(
        inst,
        [_assess(inst, ice_score="8")],
        agreement="disagree",
        physician_crs_grade="0",
        physician_icans_grade="4",
        disagreement_reason="Left hemiparesis on examination.",
    )

    assert (review["worst_icans_grade"], review["icans_grade"]) == (1, 4)
    assert _severe(inst, review) == (False, True)


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_toxicity_review_disagreeing_needs_a_reason_and_both_grades(inst: str) -> None:
    with pytest.raises(SopInputError) as info:
        _review(inst, [_assess(inst)], agreement="disagree")

    assert [p.split(": ")[1] for p in info.value.problems] == [
        "physician_crs_grade",
        "physician_icans_grade",
        "disagreement_reason",
    ]
    assert all("a value is required when \"review.agreement == 'disagree'\"" in p for p in info.value.problems)
