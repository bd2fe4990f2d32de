"""Stage 4 (edge): controlled documents rendered from Jinja templates.

Templates live in ``templates/``; ``templates/<institution>/`` overrides a template of the same
name for that institution. Autoescape is on and undefined names are errors: a quality document
must never silently miss a value. The same record renders to the same bytes (no clock, no
randomness in the context). Must not import prefect.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from flows.errors import DocumentRenderError

__all__ = ["render_document", "render_pdf"]


def _environment(templates_dir: Path, institution: str, timezone: str) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        loader=ChoiceLoader([FileSystemLoader(templates_dir / institution), FileSystemLoader(templates_dir)]),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    zone = ZoneInfo(timezone)

    def local_time(value: str | datetime | None) -> str:
        if value is None:
            return ""
        dt = datetime.fromisoformat(value) if isinstance(value, str) else value
        return dt.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z (UTC%z)")

    def num(value: Any) -> Any:
        """A whole float without its '.0' (entered numbers are stored as floats: 68.0 -> 68)."""
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            return int(value)
        return value

    env.filters["local_time"] = local_time
    env.filters["num"] = num
    return env


def render_pdf(html: str, base_dir: Path) -> bytes:
    """The PDF of a rendered document (WeasyPrint, imported here only: the CLI stays light).

    Deterministic: WeasyPrint 70 writes no creation date unless the HTML names one, and its
    file identifier is derived from the content, so the same HTML gives the same bytes.

    Raises:
        DocumentRenderError: WeasyPrint or its system libraries (Pango) are missing or fail.
    """
    try:
        from weasyprint import HTML
    except (ImportError, OSError) as exc:
        raise DocumentRenderError("pdf", f"WeasyPrint is not usable here: {exc}") from exc
    try:
        return bytes(HTML(string=html, base_url=str(base_dir)).write_pdf())
    except Exception as exc:
        raise DocumentRenderError("pdf", f"WeasyPrint failed: {type(exc).__name__}: {exc}") from exc


def render_document(
    templates_dir: Path, institution: str, timezone: str, template: str, context: dict[str, Any]
) -> tuple[str, str]:
    """Render ``template`` with ``context``; returns (text, sha256 of its UTF-8 bytes).

    Raises:
        DocumentRenderError: the template is missing, broken, uses a value the record lacks, or
            reaches for something the sandbox refuses.
    """
    env = _environment(templates_dir, institution, timezone)
    try:
        text = env.get_template(template).render(**context)
    except TemplateNotFound as exc:
        raise DocumentRenderError(template, f"not found under {templates_dir}") from exc
    except TemplateSyntaxError as exc:
        raise DocumentRenderError(template, f"line {exc.lineno}: {exc.message}") from exc
    except UndefinedError as exc:
        raise DocumentRenderError(template, f"uses a value the record does not have: {exc.message}") from exc
    except SecurityError as exc:
        raise DocumentRenderError(template, f"refused by the sandbox: {exc.message}") from exc
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()
