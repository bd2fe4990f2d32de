"""Stage 1 of the data path: identifier formats a text field may declare (``format:``).

``isbt128_din``: an ISBT 128 Donation Identification Number as printed eye-readable: 13
characters (5-character facility id, 2-digit year, 6-digit serial) and its ISO/IEC 7064
Mod 37-2 check character. Spaces are ignored (``G1234 98 654321 H``); letters are upper-cased;
the stored value is the 14 characters without spaces.

``coi``: a manufacturer's chain-of-identity id; its pattern is the run's product's
``coi_pattern`` (``products.yaml``), checked in :mod:`flows.sop.inputs`.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import re

__all__ = ["MOD37_2_CHARSET", "din_check_character", "normalize_din"]

MOD37_2_CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*"
"""ISO/IEC 7064 Mod 37-2: the value of each character is its index here."""

_DIN = re.compile(r"^[A-Z0-9]{5}[0-9]{2}[0-9]{6}$")


def din_check_character(din: str) -> str:
    """The Mod 37-2 check character of the 13 DIN characters (ISO/IEC 7064, pure system, radix 2).

    Raises:
        ValueError: a character outside 0-9, A-Z, *.
    """
    p = 0
    for ch in din:
        value = MOD37_2_CHARSET.find(ch)
        if value < 0:
            raise ValueError(f"{ch!r} is not a character of ISO 7064 Mod 37-2")
        p = ((p + value) * 2) % 37
    return MOD37_2_CHARSET[(38 - p) % 37]


def normalize_din(value: str) -> tuple[str, str | None]:
    """``(the DIN without spaces, problem or None)``: the problem states the rule. A wrong check
    character is refused without naming the right one: a message that gave it away would let
    anyone complete a misread DIN instead of reading the label again."""
    din = "".join(value.split()).upper()
    if len(din) != 14 or not _DIN.match(din[:13]):
        return din, (
            "is not an ISBT 128 donation identification number: expected 13 characters "
            "(5-character facility id A-Z/0-9, 2-digit year, 6-digit serial) and a check character, "
            f"{len(din)} characters given without spaces"
        )
    expected = din_check_character(din[:13])
    if din[13] != expected:
        return din, (
            f"check character {din[13]!r} does not match DIN {din[:13]} (ISO 7064 Mod 37-2): "
            "a character was misread or mistyped; read the label again"
        )
    return din, None
