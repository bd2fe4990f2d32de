"""Stage 1 of the data path: the one place an entered value is normalised, or refused with the rule.

:mod:`flows.sop.inputs` calls these for every run parameter and step field, from the command line,
the web and the API alike:

    text       normalised to Unicode NFC; refused: control characters (NUL, ESC ...), bidirectional
               controls (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069), U+2028/U+2029,
               U+FEFF and lone surrogates. A ``multiline: true`` field keeps newlines and tabs (CR LF
               and CR become LF); any other field is one line. At most ``max_length`` characters,
               or MAX_TEXT when the field sets none. A ``pattern`` must match the whole value.
    numbers    NUMBER_RULE below, as text or a JSON number; refused: ``1_0``, ``٣``, ``inf``/``nan``,
               a value too large for a float (``1e400``) and a non-zero value that would be stored
               as 0 (``1e-400``). ``integer: true``: whole numbers only.
    datetimes  ISO 8601 with ASCII digits and an offset (``2026-11-03T09:30+08:00``, ``...Z``); with
               ``now`` given, refused more than ``future_skew`` (default 5 min) ahead of it; with
               ``not_before`` (the run's start) given, refused before it unless the field says
               ``before_start: allowed``.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "DEFAULT_FUTURE_SKEW",
    "MAX_TEXT",
    "NUMBER_RULE",
    "BadValue",
    "kind_of",
    "normalize_datetime",
    "normalize_number",
    "normalize_text",
]

MAX_TEXT = 10_000
"""Longest text a field takes when it sets no ``max_length``."""
DEFAULT_FUTURE_SKEW = timedelta(minutes=5)
"""How far ahead of the clock a recorded time may be (clocks of people and machines differ)."""
NUMBER_RULE = "ASCII digits with an optional sign, one decimal point and an optional exponent (e.g. -160, 37.5, 1.2e3)"

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_MAX_NUMBER_CHARS = 64
_DATETIME = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?"
)
_EXAMPLE = "2026-11-03T09:30+08:00"
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMES = {"\u202e": "right-to-left override", "\u202d": "left-to-right override", "\ufeff": "byte-order mark"}


class BadValue(Exception):
    """One value is refused; the message states the rule (and the value unless it is PHI)."""


def _refused_character(char: str, multiline: bool) -> str | None:
    """Why ``char`` may not be in a text value, or None when it may."""
    if char in "\n\t" and multiline:
        return None
    if char == "\n":
        return "a line break; this field takes one line"
    category = unicodedata.category(char)
    if char in _BIDI or char in "\u2028\u2029\ufeff":
        kind = _NAMES.get(char, "bidirectional control" if char in _BIDI else "line or paragraph separator")
        return f"the {kind} U+{ord(char):04X}, which can make text display otherwise than it reads"
    if category == "Cc":
        return f"the control character U+{ord(char):04X}"
    if category == "Cs":
        return f"a lone surrogate U+{ord(char):04X} (not a character)"
    return None


def normalize_text(value: str, *, multiline: bool, max_length: int | None, pattern: str | None, show: str) -> str:
    """The value in NFC, checked against the rules above.

    Raises:
        BadValue: the first rule it breaks.
    """
    if multiline:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    for position, char in enumerate(value, start=1):
        problem = _refused_character(char, multiline)
        if problem is not None:
            raise BadValue(f"contains {problem} (at character {position}); remove it")
    text = unicodedata.normalize("NFC", value)
    limit = max_length or MAX_TEXT
    if len(text) > limit:
        raise BadValue(f"is {len(text)} characters long; the maximum is {limit}")
    if pattern is not None and re.fullmatch(pattern, text) is None:
        raise BadValue(f"{show} does not match the required pattern {pattern!r}")
    return text


def normalize_number(value: Any, show: str) -> float:
    """A float by the one number rule.

    Raises:
        BadValue: not a number by the rule, or one a float cannot hold.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadValue(f"expected a number, got {kind_of(value)}")
    if isinstance(value, str):
        text = value.strip(" ")
        if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise BadValue(f"{show} is not a finite number")
        if len(text) > _MAX_NUMBER_CHARS or _NUMBER.fullmatch(text) is None:
            raise BadValue(f"{show} is not a number: use {NUMBER_RULE}")
        number = float(text)
        mantissa = text.lower().partition("e")[0]
        if number == 0 and any(c in "123456789" for c in mantissa):
            raise BadValue(f"{show} is too small to store: it is not zero, but a float would hold it as 0")
    else:
        try:
            number = float(value)
        except OverflowError:
            raise BadValue(f"{show} is too large to store") from None
    if math.isnan(number):
        raise BadValue(f"{show} is not a finite number")
    if math.isinf(number):
        raise BadValue(f"{show} is too large to store (a float holds at most about 1.8e308)")
    return number


def _span(delta: timedelta) -> str:
    minutes = round(delta.total_seconds() / 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // 1440} days"


def normalize_datetime(
    value: Any,
    show: str,
    *,
    now: datetime | None = None,
    not_before: datetime | None = None,
    before_start_allowed: bool = False,
    future_skew: timedelta = DEFAULT_FUTURE_SKEW,
) -> str:
    """The moment as an ISO 8601 string in UTC, checked against the clock rules above.

    Raises:
        BadValue: not an ISO 8601 date and time with an offset, or not a time this field can record.
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        text = value.strip(" ")
        found = _DATETIME.fullmatch(text)
        if found is None:
            raise BadValue(f"{show} is not an ISO 8601 date and time like {_EXAMPLE}")
        if found.group("zone") is None:
            raise BadValue(f"{show} has no time zone; add an offset like +08:00 (e.g. {_EXAMPLE})")
        try:
            moment = datetime.fromisoformat(text)
        except ValueError as exc:
            raise BadValue(f"{show} is not a date and time that exists: {exc}") from None
    else:
        raise BadValue(f"expected a date and time, got {kind_of(value)}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise BadValue(f"{show} has no time zone; add an offset like +08:00 (e.g. {_EXAMPLE})")
    zone = moment.tzinfo
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:
        raise BadValue(f"{show} is outside the years 1 to 9999 in UTC") from None
    moment = utc
    if now is not None and moment > now + future_skew:
        raise BadValue(
            f"{show} is {_span(moment - now)} in the future (the clock says {now.astimezone(zone).isoformat()}); "
            f"a recorded time may be at most {_span(future_skew)} ahead: check the date, the time and the offset"
        )
    if not_before is not None and moment < not_before and not before_start_allowed:
        raise BadValue(
            f"{show} is before the run started ({not_before.astimezone(zone).isoformat()}); this field records "
            "a time during the run (an SOP whose field records earlier times says 'before_start: allowed')"
        )
    return utc.isoformat()


def kind_of(value: Any) -> str:
    names = {str: "text", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
