"""Stage 1 of the data path: find institutions, products and SOPs on disk, and validate them.

Layout: ``sops/<institution>/{institution,products,<sop_id>}.yaml`` and document templates in
``templates/`` (``templates/<institution>/`` overrides). The folders default to the repository's
``sops/`` and ``templates/``; the environment variables ``SOPFLOW_SOPS_DIR`` and
``SOPFLOW_TEMPLATES_DIR`` override them. Nothing is cached: every call reads the files again,
so what runs is what is on disk (the sha256 in :class:`LoadedSop` says exactly which bytes).

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from flows.config import bundled_dir
from flows.errors import Problem, SopDefinitionError, SopNotFoundError, did_you_mean
from flows.sop.load import (
    LoadedSop,
    display_path,
    load_institution_file,
    load_products_file,
    load_sop,
)
from flows.sop.model import ID_PATTERN, InstitutionSpec, ProductSpec

__all__ = ["Catalog", "Institution", "default_sops_dir", "default_templates_dir"]

INSTITUTION_FILE = "institution.yaml"
PRODUCTS_FILE = "products.yaml"


def default_sops_dir() -> Path:
    """``$SOPFLOW_SOPS_DIR`` or the built-in library (the checkout's ``sops/``, or the wheel's copy)."""
    return Path(os.environ.get("SOPFLOW_SOPS_DIR") or bundled_dir("sops"))


def default_templates_dir() -> Path:
    """``$SOPFLOW_TEMPLATES_DIR`` or the built-in templates (the checkout's ``templates/``, or the wheel's)."""
    return Path(os.environ.get("SOPFLOW_TEMPLATES_DIR") or bundled_dir("templates"))


@dataclass(frozen=True)
class Institution:
    """One institution's folder, fully loaded and checked."""

    spec: InstitutionSpec
    products: dict[str, ProductSpec]
    sops: dict[str, LoadedSop]
    dir: Path


def _not_found(what: str, wanted: str, options: list[str], where: str = "") -> SopNotFoundError:
    hint = did_you_mean(wanted, sorted(options), f"Known {what}s") or f"There are no {what}s."
    return SopNotFoundError(f"no {what} {wanted!r}{where}. {hint}")


class Catalog:
    """The SOPs, products and institutions under one ``sops/`` folder."""

    def __init__(self, sops_dir: Path | None = None, templates_dir: Path | None = None) -> None:
        self.sops_dir = Path(sops_dir) if sops_dir is not None else default_sops_dir()
        self.templates_dir = Path(templates_dir) if templates_dir is not None else default_templates_dir()

    # --- discovery ----------------------------------------------------------------------

    def institutions(self) -> list[str]:
        """Ids of the institution folders (those with an ``institution.yaml``), sorted."""
        if not self.sops_dir.is_dir():
            return []
        return sorted(d.name for d in self.sops_dir.iterdir() if (d / INSTITUTION_FILE).is_file())

    def _dir(self, inst_id: str) -> Path:
        if not re.match(ID_PATTERN, inst_id) or inst_id not in self.institutions():
            raise _not_found("institution", inst_id, self.institutions())
        return self.sops_dir / inst_id

    def _sop_ids(self, folder: Path) -> list[str]:
        return sorted(p.stem for p in folder.glob("*.yaml") if p.name not in (INSTITUTION_FILE, PRODUCTS_FILE))

    def _products(self, folder: Path) -> dict[str, ProductSpec]:
        path = folder / PRODUCTS_FILE
        return dict(load_products_file(path).products) if path.is_file() else {}

    # --- loading ------------------------------------------------------------------------

    def institution(self, inst_id: str) -> Institution:
        """Load an institution's folder: institution, products and every SOP, all checked.

        Raises:
            SopNotFoundError: no institution folder by that id.
            SopDefinitionError: every problem in every file of the folder, at once.
        """
        folder = self._dir(inst_id)
        problems: list[Problem] = []
        spec: InstitutionSpec | None = None
        products: dict[str, ProductSpec] = {}
        sops: dict[str, LoadedSop] = {}
        try:
            spec = load_institution_file(folder / INSTITUTION_FILE)
        except SopDefinitionError as exc:
            problems.extend(exc.problems)
        try:
            products = self._products(folder)
        except SopDefinitionError as exc:
            problems.extend(exc.problems)
        for sop_id in self._sop_ids(folder):
            try:
                sops[sop_id] = load_sop(
                    folder / f"{sop_id}.yaml",
                    institution=spec,
                    templates_dir=self.templates_dir,
                )
            except SopDefinitionError as exc:
                problems.extend(exc.problems)
        if problems or spec is None:
            raise SopDefinitionError(problems)
        return Institution(spec=spec, products=products, sops=sops, dir=folder)

    def get_sop(self, inst_id: str, sop_id: str) -> LoadedSop:
        """Load and check one SOP of an institution (other SOPs in the folder are not read).

        Raises:
            SopNotFoundError: no institution or SOP by that id.
            SopDefinitionError: the SOP or the institution file is invalid.
        """
        folder = self._dir(inst_id)
        ids = self._sop_ids(folder)
        if sop_id not in ids:
            raise _not_found("SOP", sop_id, ids, f" in {inst_id}")
        institution = load_institution_file(folder / INSTITUTION_FILE)
        return load_sop(
            folder / f"{sop_id}.yaml",
            institution=institution,
            templates_dir=self.templates_dir,
        )

    def product(self, inst_id: str, product_id: str) -> ProductSpec:
        """One product from an institution's catalogue.

        Raises:
            SopNotFoundError: no institution or product by that id.
            SopDefinitionError: ``products.yaml`` is invalid.
        """
        products = self._products(self._dir(inst_id))
        if product_id not in products:
            raise _not_found("product", product_id, list(products), f" in {inst_id}'s catalogue")
        return products[product_id]

    def products(self, inst_id: str) -> dict[str, ProductSpec]:
        """An institution's product catalogue (empty without ``products.yaml``).

        Raises:
            SopNotFoundError: no institution by that id.
            SopDefinitionError: ``products.yaml`` is invalid.
        """
        return self._products(self._dir(inst_id))

    # --- validation ---------------------------------------------------------------------

    def files(self, path: Path | None = None) -> list[Path]:
        """The YAML files :meth:`validate` reads for ``path`` (default: the whole sops folder)."""
        path = Path(path) if path is not None else self.sops_dir
        if path.is_dir():
            return sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml") and p.is_file())
        return [path]

    def validate(self, path: Path | None = None) -> list[Problem]:
        """Every problem in a file, an institution folder or the whole sops folder (default).

        Returns the problems (empty: all good); raises nothing.
        """
        files = self.files(path)
        if not files:
            where = display_path(Path(path) if path is not None else self.sops_dir)
            return [Problem(where, None, "", "no such file, or no .yaml files in that folder")]
        institutions: dict[Path, InstitutionSpec | None] = {}
        problems: list[Problem] = []
        for file in files:
            problems.extend(self._validate_file(file, files, institutions))
        return problems

    def _validate_file(
        self,
        file: Path,
        files: list[Path],
        institutions: dict[Path, InstitutionSpec | None],
    ) -> list[Problem]:
        shown = display_path(file)
        if not file.is_file():
            return [Problem(shown, None, "", "no such file")]
        if file.suffix != ".yaml":
            return [Problem(shown, None, "", "SOP files end in '.yaml'; rename it")]
        problems: list[Problem] = []
        try:
            if file.name == INSTITUTION_FILE:
                load_institution_file(file)
            elif file.name == PRODUCTS_FILE:
                load_products_file(file)
            else:
                inst_file = file.parent / INSTITUTION_FILE
                if not inst_file.is_file():
                    return [
                        Problem(
                            shown,
                            None,
                            "",
                            f"no {INSTITUTION_FILE} beside it; SOPs live in sops/<institution>/",
                        )
                    ]
                if inst_file not in institutions:
                    institutions[inst_file] = self._institution_or_none(inst_file)
                if institutions[inst_file] is None and inst_file not in files:
                    problems.append(
                        Problem(
                            shown,
                            None,
                            "",
                            f"roles not checked: {display_path(inst_file)} is invalid",
                        )
                    )
                load_sop(
                    file,
                    institution=institutions[inst_file],
                    templates_dir=self.templates_dir,
                )
        except SopDefinitionError as exc:
            problems.extend(exc.problems)
        return problems

    @staticmethod
    def _institution_or_none(path: Path) -> InstitutionSpec | None:
        try:
            return load_institution_file(path)
        except SopDefinitionError:
            return None
