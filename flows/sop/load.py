"""Stage 1 of the data path: SOP YAML files -> validated, frozen definitions, with line numbers.

Reads ``sops/<institution>/*.yaml`` through :mod:`flows.sop.source` (safe YAML with line marks,
pydantic errors as ``file:line`` problems), validates against the models in
:mod:`flows.sop.model` and cross-checks SOPs with :mod:`flows.sop.check`. All problems of a file
are collected and raised once as :class:`~flows.errors.SopDefinitionError`.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from flows.errors import Problem, SopDefinitionError
from flows.sop.definition import check_definition
from flows.sop.model import InstitutionSpec, ProductCatalogSpec
from flows.sop.source import LineMap, LoadedSop, display_path, dotted, parse_yaml, problems_from

__all__ = [
    "LineMap",
    "LoadedSop",
    "display_path",
    "dotted",
    "load_institution_file",
    "load_products_file",
    "load_sop",
]

M = TypeVar("M", bound=BaseModel)


# --- public loaders ---------------------------------------------------------------------


def _read(path: Path) -> tuple[str, str, bytes]:
    file = display_path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SopDefinitionError([Problem(file, None, "", f"cannot read the file: {exc.strerror}")]) from exc
    try:
        return file, raw.decode("utf-8"), raw
    except UnicodeDecodeError as exc:
        raise SopDefinitionError([Problem(file, None, "", f"the file is not UTF-8 text: {exc.reason}")]) from exc


def _load(path: Path, model: type[M]) -> tuple[M, str, str, LineMap]:
    file, text, raw = _read(path)
    data, lines, problems = parse_yaml(text, file)
    if data is None:
        raise SopDefinitionError(problems)
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, model, file, lines))
    if problems:
        raise SopDefinitionError(sorted(problems, key=lambda p: (p.line or 0, p.path)))
    return result, text, hashlib.sha256(raw).hexdigest(), lines


def load_sop(
    path: Path | str,
    *,
    institution: InstitutionSpec | None = None,
    templates_dir: Path | None = None,
) -> LoadedSop:
    """Load, validate and cross-check one SOP file.

    Checks that need nothing else (step ids, ``verify.of``, expressions...) always run, also for
    the parts of a file that validate when others do not; roles are checked when ``institution``
    is given, templates when ``templates_dir`` is given.

    Raises:
        SopDefinitionError: every problem in the file, at once.
    """
    path = Path(path)
    file, text, raw = _read(path)
    data, lines, problems = parse_yaml(text, file)
    if data is None:
        raise SopDefinitionError(problems)
    if "id" in data and data["id"] != path.stem:
        problems.append(
            Problem(
                file,
                lines.line("id"),
                "id",
                f"id {data['id']!r} must equal the file name {path.stem!r}",
            )
        )
    return check_definition(
        data,
        file=file,
        path=path,
        text=text,
        sha256=hashlib.sha256(raw).hexdigest(),
        lines=lines,
        problems=problems,
        institution=institution,
        templates_dir=templates_dir,
    )


def load_institution_file(path: Path | str) -> InstitutionSpec:
    """Load ``sops/<institution>/institution.yaml``; its ``id`` must equal the folder name.

    Raises:
        SopDefinitionError: every problem in the file, at once.
    """
    path = Path(path)
    spec, _, _, lines = _load(path, InstitutionSpec)
    folder = path.absolute().parent.name  # 'institution.yaml' alone is in the working directory
    if spec.id != folder:
        problem = f"id {spec.id!r} must equal the institution's folder name {folder!r}"
        raise SopDefinitionError([Problem(display_path(path), lines.line("id"), "id", problem)])
    return spec


def load_products_file(path: Path | str) -> ProductCatalogSpec:
    """Load ``sops/<institution>/products.yaml``.

    Raises:
        SopDefinitionError: every problem in the file, at once.
    """
    return _load(Path(path), ProductCatalogSpec)[0]
