"""Stage 1 of the data path: SOP YAML -> validated, frozen definitions.

    safe_yaml.py    the bounded YAML reader every text goes through (size, tags, aliases, depth)
    source.py       YAML with line marks; pydantic errors as file:line problems
    load.py         load_sop / load_institution_file / load_products_file, with file:line problems
    definition.py   schema problems and cross-checks in one pass (the parts that validate)
    check.py        cross-references: step ids, roles, verify.of, templates (templates.py)
    check_expressions.py  what expressions may read; lookups (lookup.py) against their key field
    expressions.py  sandboxed Jinja checks and messages: checked at load, evaluated at run time
    sandbox.py      the bounds every evaluation runs within (size, loops, calls, time)
    catalog.py      Catalog: institutions, products and SOPs on disk; validate()
    inputs.py       coerce_values / compute_fields: run parameters and step fields against FieldSpecs
    normalize.py    the one input normaliser (text, numbers, datetimes and the clock)
    schema.py       JSON Schemas for editors
    model.py        the frozen pydantic models (fields.py, institution.py)

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
