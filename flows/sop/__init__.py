"""Stage 1 of the data path: SOP YAML -> validated, frozen definitions.

    load.py         load_sop / load_institution_file / load_products_file, with file:line problems
    check.py        cross-references: step ids, roles, verify.of, templates, expression names
    expressions.py  sandboxed Jinja checks and messages: checked at load, evaluated at run time
    catalog.py      Catalog: institutions, products and SOPs on disk; validate()
    inputs.py       coerce_values: run parameters and step fields against their FieldSpecs
    schema.py       JSON Schemas for editors
    model.py        the frozen pydantic models

Pure: ``flows.sop`` imports neither ``prefect`` nor ``sqlmodel`` nor ``flows.engine`` /
``flows.record`` (tests/test_sop_load.py asserts it in a fresh interpreter).
"""

from __future__ import annotations

from flows.sop.catalog import (
    Catalog,
    Institution,
    default_sops_dir,
    default_templates_dir,
)
from flows.sop.check import check_sop, find_template
from flows.sop.expressions import ExpressionError, Scope, evaluate_check, render_message
from flows.sop.inputs import coerce_values
from flows.sop.load import (
    LoadedSop,
    load_institution_file,
    load_products_file,
    load_sop,
)
from flows.sop.model import (
    FieldSpec,
    InstitutionSpec,
    ProductCatalogSpec,
    ProductSpec,
    SopDefinition,
    StepSpec,
)
from flows.sop.schema import (
    institution_json_schema,
    products_json_schema,
    sop_json_schema,
)

__all__ = [
    "Catalog",
    "ExpressionError",
    "FieldSpec",
    "Institution",
    "InstitutionSpec",
    "LoadedSop",
    "ProductCatalogSpec",
    "ProductSpec",
    "Scope",
    "SopDefinition",
    "StepSpec",
    "check_sop",
    "coerce_values",
    "default_sops_dir",
    "default_templates_dir",
    "evaluate_check",
    "find_template",
    "institution_json_schema",
    "load_institution_file",
    "load_products_file",
    "load_sop",
    "products_json_schema",
    "render_message",
    "sop_json_schema",
]
