"""Stage 1: one input normaliser for every run parameter and step field (issue 15): full-match
patterns, NFC text without control or bidi characters, one number rule, and time sanity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.errors import SopInputError
from flows.sop import coerce_values
from flows.sop.model import FieldSpec
from flows.sop.normalize import MAX_TEXT

LOT = FieldSpec(type="text", pattern="^[A-Z0-9-]{3,30}$")
NOTE = FieldSpec(type="text", multiline=True, max_length=200)
NUMBER = FieldSpec(type="number")
NOW = datetime(2026, 11, 3, 1, 30, tzinfo=UTC)
STARTED = datetime(2026, 11, 3, 0, 0, tzinfo=UTC)


def _value(spec: FieldSpec, value: object, **clock: object) -> object:
    return coerce_values({"x": spec}, {"x": value}, where="s", **clock)["x"]  # type: ignore[arg-type]


def _problem(spec: FieldSpec, value: object, **clock: object) -> str:
    with pytest.raises(SopInputError) as info:
        coerce_values({"x": spec}, {"x": value}, where="s", **clock)  # type: ignore[arg-type]
    [problem] = info.value.problems
    return problem.removeprefix("s: x: ")


# --------------------------------------------------------------------------- text


def test_text_with_a_trailing_newline_no_longer_passes_an_anchored_pattern() -> None:
    """'DS-0042\\n' matched '^...$' with re.search (the '$' matches before a final newline) and was stored."""
    assert _problem(LOT, "DS-0042\n") == "contains a line break; this field takes one line (at character 8); remove it"
    assert _value(LOT, "DS-0042") == "DS-0042"


def test_text_pattern_must_match_the_whole_value() -> None:
    spec = FieldSpec(type="text", pattern="[A-Z]{2}-[0-9]{4}")

    assert _problem(spec, "xDS-0042y") == "'xDS-0042y' does not match the required pattern '[A-Z]{2}-[0-9]{4}'"
    assert _value(spec, "DS-0042") == "DS-0042"


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("lot\x00", "the control character U+0000 (at character 4)"),
        ("a\x1b[31mred", "the control character U+001B (at character 2)"),
        ("abc\u202edcba", "the right-to-left override U+202E"),
        ("\u2066x\u2069", "the bidirectional control U+2066"),
        ("a\u200fb", "the bidirectional control U+200F"),
        ("a\u2028b", "the line or paragraph separator U+2028"),
        ("\ufeffabc", "the byte-order mark U+FEFF"),
        ("a\ud800b", "a lone surrogate U+D800"),
        ("tab\there", "the control character U+0009"),
    ],
    ids=["nul", "escape", "rlo", "isolate", "rlm", "line-separator", "bom", "surrogate", "tab-in-one-line"],
)
def test_text_refuses_control_and_bidi_characters(value: str, what: str) -> None:
    assert _problem(FieldSpec(type="text"), value).startswith(f"contains {what}")


def test_multiline_text_keeps_newlines_and_tabs_and_reads_crlf_as_newline() -> None:
    assert _value(NOTE, "line 1\r\n\tline 2\rline 3") == "line 1\n\tline 2\nline 3"
    assert _problem(NOTE, "line 1\n\x07").startswith("contains the control character U+0007")
    assert _problem(NOTE, "a\u202eb").startswith("contains the right-to-left override U+202E")


def test_text_is_stored_in_nfc() -> None:
    assert _value(FieldSpec(type="text"), "Jose\u0301") == "Jos\u00e9"
    assert _value(FieldSpec(type="choice", choices=("caf\u00e9",)), "cafe\u0301") == "caf\u00e9"


def test_text_without_max_length_is_still_bounded() -> None:
    assert _value(FieldSpec(type="text"), "x" * MAX_TEXT) == "x" * MAX_TEXT
    assert (
        _problem(FieldSpec(type="text"), "x" * (MAX_TEXT + 1))
        == f"is {MAX_TEXT + 1} characters long; the maximum is {MAX_TEXT}"
    )


def test_text_refusal_of_a_phi_field_never_echoes_the_value() -> None:
    spec = FieldSpec(type="text", phi=True, pattern="^[A-Z0-9]{4,20}$")

    assert _problem(spec, "zhang san") == "the value does not match the required pattern '^[A-Z0-9]{4,20}$'"
    assert "zhang" not in _problem(spec, "zhang\x00")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("value", "number"),
    [("37.5", 37.5), (" -160 ", -160.0), ("+1.5e3", 1500.0), (".5", 0.5), ("5.", 5.0), ("1E-3", 0.001), (7, 7.0)],
)
def test_number_rule_accepts_ascii_decimal_numbers(value: object, number: float) -> None:
    assert _value(NUMBER, value) == number


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("\u0663", "'\u0663' is not a number: use ASCII digits"),
        ("\uff13", "'\uff13' is not a number: use ASCII digits"),
        ("1_0", "'1_0' is not a number: use ASCII digits"),
        ("1.2.3", "'1.2.3' is not a number"),
        ("0x10", "'0x10' is not a number"),
        ("1e400", "'1e400' is too large to store"),
        ("1e-400", "'1e-400' is too small to store: it is not zero, but a float would hold it as 0"),
        ("-Infinity", "'-Infinity' is not a finite number"),
        (10**400, "is too large to store"),
        (float("nan"), "nan is not a finite number"),
    ],
    ids=[
        "arabic-indic",
        "fullwidth",
        "underscore",
        "two-points",
        "hex",
        "overflow",
        "underflow",
        "inf",
        "huge-int",
        "nan",
    ],
)
def test_number_rule_refuses_everything_else(value: object, message: str) -> None:
    assert message in _problem(NUMBER, value)


def test_number_zero_written_small_is_still_zero() -> None:
    assert _value(NUMBER, "0e-400") == 0.0


def test_integer_field_takes_whole_numbers_only() -> None:
    spec = FieldSpec(type="number", integer=True, min=0, max=10)

    assert _value(spec, "7") == 7.0
    assert _value(spec, "7.0") == 7.0
    assert _problem(spec, "6.5") == "6.5 is not a whole number; this field takes whole numbers only"


# --------------------------------------------------------------------------- time sanity

AT = FieldSpec(type="datetime")


def test_datetime_within_the_skew_of_the_clock_is_accepted() -> None:
    assert _value(AT, "2026-11-03T09:34+08:00", now=NOW) == "2026-11-03T01:34:00+00:00"
    assert (
        _value(AT, "2026-11-03T09:40+08:00", now=NOW, future_skew=timedelta(minutes=15)) == "2026-11-03T01:40:00+00:00"
    )


def test_datetime_in_the_future_beyond_the_skew_is_refused_saying_why() -> None:
    assert _problem(AT, "2026-11-03T11:35+08:00", now=NOW) == (
        "'2026-11-03T11:35+08:00' is 2 h 5 min in the future (the clock says 2026-11-03T09:30:00+08:00); "
        "a recorded time may be at most 5 min ahead: check the date, the time and the offset"
    )


def test_datetime_with_the_wrong_offset_reads_as_future() -> None:
    """09:30 Shanghai time entered with +00:00 is 8 h ahead."""
    assert "is 8 h 0 min in the future" in _problem(AT, "2026-11-03T09:30+00:00", now=NOW)


def test_datetime_before_the_run_started_is_refused_unless_the_field_allows_it() -> None:
    late_entry = FieldSpec(type="datetime", before_start="allowed")

    assert _problem(AT, "2026-11-02T23:00Z", now=NOW, not_before=STARTED) == (
        "'2026-11-02T23:00Z' is before the run started (2026-11-03T00:00:00+00:00); this field records a time "
        "during the run (an SOP whose field records earlier times says 'before_start: allowed')"
    )
    assert _value(late_entry, "2026-11-02T23:00Z", now=NOW, not_before=STARTED) == "2026-11-02T23:00:00+00:00"
    assert _value(AT, "2026-11-03T00:00Z", not_before=STARTED) == "2026-11-03T00:00:00+00:00"


def test_datetime_without_a_clock_is_checked_for_form_only() -> None:
    """Existing callers that pass neither now nor not_before keep working."""
    assert _value(AT, "2030-01-01T00:00Z") == "2030-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("\u0662\u0660\u0662\u0666-11-03T09:30+08:00", "is not an ISO 8601 date and time"),
        ("2026-02-30T09:30+08:00", "is not a date and time that exists"),
        ("2026-11-03T09:30", "has no time zone"),
        ("0001-01-01T00:00+01:00", "is outside the years 1 to 9999 in UTC"),
    ],
    ids=["arabic-indic-digits", "no-such-day", "no-offset", "before-year-1"],
)
def test_datetime_form_is_iso_8601_with_ascii_digits_and_an_offset(value: str, message: str) -> None:
    assert message in _problem(AT, value)


def test_datetime_refusal_of_a_phi_field_never_echoes_the_value() -> None:
    problem = _problem(FieldSpec(type="datetime", phi=True), "2026-11-04T09:30+08:00", now=NOW)

    assert problem.startswith("the value is 24 h 0 min in the future")
    assert "2026-11-04" not in problem
