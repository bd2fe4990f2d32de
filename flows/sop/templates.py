"""Stage 1 of the data path: which file a document step's template name resolves to.

``templates/<institution>/`` overrides ``templates/``; ``<name>.<language>.html.j2`` is preferred
over ``<name>.html.j2`` when it exists. :mod:`flows.sop.check` reports a name that resolves to
nothing; the engine renders the name :func:`template_name` gives.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

__all__ = ["find_template", "localized_name", "template_name", "template_names"]


def localized_name(name: str, language: str | None) -> str | None:
    """``record.html.j2`` -> ``record.<language>.html.j2`` (None without a language or a dot)."""
    if not language or "." not in PurePosixPath(name).name:
        return None
    head, _, rest = name.rpartition("/")
    stem, _, ext = rest.partition(".")
    return f"{head + '/' if head else ''}{stem}.{language}.{ext}"


def template_name(
    name: str, templates_dir: Path, institution: str | None = None, language: str | None = None
) -> str | None:
    """The template name a document step loads: its ``<language>`` variant when one exists
    (``templates/<institution>/`` first, then ``templates/``), else the name itself; None when
    neither exists."""
    localized = localized_name(name, language)
    for candidate in ([localized] if localized else []) + [name]:
        if find_template(candidate, templates_dir, institution) is not None:
            return candidate
    return None


def find_template(name: str, templates_dir: Path, institution: str | None = None) -> Path | None:
    """The file a document step's template resolves to: ``templates/<institution>/`` first."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        return None
    folders = ([templates_dir / institution] if institution else []) + [templates_dir]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


def template_names(templates_dir: Path, institution: str | None) -> list[str]:
    names: set[str] = set()
    for folder in ([templates_dir / institution] if institution else []) + [templates_dir]:
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if p.is_file())
    return sorted(names)
