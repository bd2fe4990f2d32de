"""Stage 1 of the data path: SOP text people read, in one language or several (issue 14).

``title: CAR-T dose receipt`` or ``title: {en: CAR-T dose receipt, zh: CAR-T 产品到货接收}``: a
``Text`` field takes either. As a ``str`` the value is the first text written (what the CLI, the
record and the tests show); ``text_in(value, language)`` picks a language. A key that names no
known language is a load error at its line. Pure: no Prefect, no database.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ValidatorFunctionWrapHandler, WithJsonSchema, WrapValidator

__all__ = ["LANGUAGES", "Localized", "Text", "text_in"]

LANGUAGES = ("en", "zh")
"""The languages SOP text may be given in (``title: {en: …, zh: …}``) and pages are shown in."""


class Localized(str):
    """SOP text given in several languages. As a ``str`` it is the first one written (what the CLI,
    the record and the tests show); ``translations`` holds each language's text (``text_in``)."""

    translations: dict[str, str]

    def __new__(cls, translations: dict[str, str]) -> Localized:
        obj = super().__new__(cls, next(iter(translations.values())))
        obj.translations = dict(translations)
        return obj

    def __reduce__(self) -> Any:  # copies and pickles keep the translations
        return (Localized, (self.translations,))


def _localized(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if not isinstance(value, dict):
        return handler(value)
    unknown = [k for k in value if k not in LANGUAGES]
    if unknown:
        raise ValueError(
            f"translations are keyed by language; {', '.join(map(repr, unknown))} is not one of {', '.join(LANGUAGES)}"
        )
    if not value or not all(isinstance(v, str) and v.strip() for v in value.values()):
        raise ValueError("translations need a non-empty text for each language given")
    return Localized(value)


Text = Annotated[
    str,
    WrapValidator(_localized),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "properties": {lang: {"type": "string"} for lang in LANGUAGES},
                    "additionalProperties": False,
                    "minProperties": 1,
                },
            ]
        }
    ),
]
"""Text people read (titles, labels, meanings): a string, or one per language (``{en: …, zh: …}``)."""


def text_in(value: str | None, language: str | None) -> str:
    """``value`` in ``language`` when the SOP gives it in that language, else as written ("" for None)."""
    if value is None:
        return ""
    translations = getattr(value, "translations", None)
    if translations and language in translations:
        return str(translations[language])
    return str(value)
