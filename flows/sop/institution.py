"""Stage 1 of the data path: what an institution and its product catalogue *are* (frozen pydantic).

    sops/<institution>/institution.yaml   InstitutionSpec: name, time zone, language, roles
    sops/<institution>/products.yaml      ProductCatalogSpec: the products checks read

Re-exported by :mod:`flows.sop.model`.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import model_validator

from flows.sop.fields import FrozenSpec as _Frozen
from flows.sop.fields import Id, Regex

__all__ = ["InstitutionSpec", "ProductCatalogSpec", "ProductSpec", "RoleSpec"]


class RoleSpec(_Frozen):
    label: str
    description: str | None = None


class InstitutionSpec(_Frozen):
    """``sops/<institution>/institution.yaml``."""

    schema_version: Literal[1]
    id: Id
    name: str
    timezone: str = "Asia/Shanghai"
    language: Literal["en", "zh"] = "en"
    """Language of its controlled documents: ``<name>.<language>.html.j2`` is used when present."""
    roles: dict[Id, RoleSpec]


class ProductSpec(_Frozen):
    """One product in the catalogue; checks read it as ``product.<key>``."""

    name: str
    mah: str
    storage_max_c: float | None = None
    """Warmest storage/transit temperature allowed, in °C (e.g. -150)."""
    thaw_to_infusion_max_min: float | None = None
    """Minutes allowed from end of thaw to end of infusion."""
    shipper_hold_days: float | None = None
    documents: tuple[str, ...] = ()
    """Documents expected with each dose (e.g. 'CoA', 'RFI')."""
    unconfirmed: tuple[str, ...] = ()
    """Keys whose value the research could not confirm; the institution must set them."""
    source: str | None = None
    coi_pattern: Regex | None = None
    """Regular expression the whole value of a ``format: coi`` field must match for this product (the manufacturer's chain-of-identity id)."""
    coi_example: str | None = None
    """A chain-of-identity id that matches ``coi_pattern``, shown to people entering one."""

    @model_validator(mode="after")
    def _coi_example_matches(self) -> ProductSpec:
        if self.coi_example is not None and self.coi_pattern is None:
            raise ValueError("'coi_example' needs a 'coi_pattern' it matches")
        if (
            self.coi_example is not None
            and self.coi_pattern is not None
            and not re.fullmatch(self.coi_pattern, self.coi_example)
        ):
            raise ValueError(f"'coi_example' {self.coi_example!r} does not match 'coi_pattern' {self.coi_pattern!r}")
        return self

    # Catalogue keys added with the SOP library (all optional; ``unconfirmed`` may name any of them).
    name_zh: str | None = None
    approvals: tuple[str, ...] = ()
    """Where and when approved ('NMPA 2021-06-22', 'FDA 2017-10-18')."""
    thaw_clock_from: Literal["thaw_start", "thaw_end"] = "thaw_end"
    """Where the thaw-to-infusion limit starts (Abecma: start of thaw)."""
    infusion_start_max_min: float | None = None
    """Minutes allowed from end of thaw to the start of infusion."""
    shelf_life_months: float | None = None
    ld_to_infusion_min_days: float | None = None
    """Infusion window after the end of lymphodepletion, in days (e.g. Carvykti 2-4)."""
    ld_to_infusion_max_days: float | None = None
    tocilizumab_doses_min: int | None = None
    """Tocilizumab doses that must be on site for the patient before infusion."""

    @model_validator(mode="after")
    def _unconfirmed_names_keys(self) -> ProductSpec:
        settable = set(type(self).model_fields) - {"name", "mah", "unconfirmed", "source"}
        unknown = [k for k in self.unconfirmed if k not in settable]
        if unknown:
            raise ValueError(
                f"'unconfirmed' names {', '.join(map(repr, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not a product key; keys: {', '.join(sorted(settable))}"
            )
        return self


class ProductCatalogSpec(_Frozen):
    """``sops/<institution>/products.yaml``."""

    schema_version: Literal[1]
    products: dict[Id, ProductSpec]
