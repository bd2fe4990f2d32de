"""Edge: the web pages' languages, through Jinja's ``i18n`` extension and gettext catalogues.

Message ids are the English text. ``flows/web/locales/<lang>.po`` holds each other language's
catalogue (standard gettext PO, read here at start-up with no compiler step, so there is no .mo
to forget to rebuild). English needs no catalogue: a message id is its own English text.

``missing_translations`` lists every message of the templates (``_`` calls, ``trans`` blocks)
and of the views (``N_`` markers in ``flows/web/*.py``) that a catalogue lacks; the
tests fail on any. Pages never hard-code a sentence outside these.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["LOCALES", "N_", "Catalogue", "catalogue", "extract_messages", "missing_translations", "pick_language"]

HERE = Path(__file__).resolve().parent
LOCALES = HERE / "locales"
TEMPLATES = HERE / "templates"


def N_(message: str) -> str:
    """Mark a string for translation where it is defined; ``gettext`` translates it where shown."""
    return message


def _unquote(s: str) -> str:
    return str(ast.literal_eval(s))


def parse_po(text: str) -> dict[str, str]:
    """msgid → msgstr of a PO file (plural forms: the singular; fuzzy and empty entries left out)."""
    out: dict[str, str] = {}
    msgid: list[str] = []
    msgstr: list[str] = []
    fuzzy = False
    target: list[str] | None = None

    def flush() -> None:
        nonlocal fuzzy
        mid, mstr = "".join(msgid), "".join(msgstr)
        if mid and mstr and not fuzzy:
            out[mid] = mstr
        msgid.clear()
        msgstr.clear()
        fuzzy = False

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("#,") and "fuzzy" in line:
                if msgid or msgstr:
                    flush()
                fuzzy = True
            continue
        if line.startswith("msgid "):
            if msgid or msgstr:
                flush()  # the previous entry (a "#, fuzzy" before this one has flushed it already)
            target = msgid
            target.append(_unquote(line[6:]))
        elif line.startswith("msgstr"):
            target = msgstr
            target.append(_unquote(line.split(" ", 1)[1]))
        elif line.startswith('"') and target is not None:
            target.append(_unquote(line))
    flush()
    return out


class Catalogue:
    """gettext / ngettext over one language's messages (the English id when a message is missing)."""

    def __init__(self, language: str, messages: dict[str, str]) -> None:
        self.language = language
        self.messages = messages

    def gettext(self, message: str) -> str:
        return self.messages.get(message, message)

    def ngettext(self, singular: str, plural: str, n: int) -> str:
        return self.gettext(singular if n == 1 else plural)


@cache
def catalogue(language: str) -> Catalogue:
    path = LOCALES / f"{language}.po"
    return Catalogue(language, parse_po(path.read_text(encoding="utf-8")) if path.is_file() else {})


def pick_language(accept_language: str | None, default: str = "en") -> str:
    """``zh`` or ``en`` from an Accept-Language header, by the order the browser gives."""
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return default


_PY_MESSAGE = re.compile(r"""\bN?_\(\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*[,)]""")


def extract_messages(env: Any) -> dict[str, list[str]]:
    """Every translatable message of the templates and the views → where it occurs."""
    found: dict[str, list[str]] = {}
    for path in sorted(TEMPLATES.rglob("*.html")):
        source = path.read_text(encoding="utf-8")
        for lineno, _func, message in env.extract_translations(source):
            for m in message if isinstance(message, tuple) else (message,):
                if m:
                    found.setdefault(m, []).append(f"{path.name}:{lineno}")
    for path in sorted(HERE.glob("*.py")):
        for m in _PY_MESSAGE.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(_unquote(m.group(1)), []).append(path.name)
    return found


def missing_translations(env: Any, language: str = "zh") -> dict[str, list[str]]:
    """Messages the language's catalogue lacks, with where they occur."""
    have = catalogue(language).messages
    return {m: where for m, where in extract_messages(env).items() if m not in have}
