"""Stage 1 of the data path: JSON Schemas of the SOP files, for editors' completion.

Generated from the pydantic models in :mod:`flows.sop.model`, so they never drift from what
the loader accepts. Point an editor at them, e.g. for the YAML language server::

    # yaml-language-server: $schema=../../sop.schema.json

``sopflow sop schema --output sop.schema.json`` writes the SOP schema.

Pure: must not import ``prefect``, ``sqlmodel``, ``flows.engine`` or ``flows.record``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from flows.sop.model import InstitutionSpec, ProductCatalogSpec, SopDefinition

__all__ = [
    "SCHEMA_KINDS",
    "institution_json_schema",
    "products_json_schema",
    "sop_json_schema",
]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_DURATION = {
    "type": "string",
    "pattern": r"^\s*\d+(\.\d+)?\s*(s|m|min|h|d)\s*$",
    "description": "A duration: '90s', '30m', '4h' or '2d'.",
    "examples": ["30m", "4h", "2d"],
}


def _with_durations(node: Any) -> Any:
    """pydantic says ISO 8601 for a timedelta; our files write '4h', so say that instead."""
    if isinstance(node, dict):
        if node.get("format") == "duration":
            return dict(_DURATION)
        return {k: _with_durations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_durations(v) for v in node]
    return node


def _schema(model: type[BaseModel], title: str, description: str) -> dict[str, Any]:
    schema = _with_durations(model.model_json_schema(mode="validation"))
    return {"$schema": _DIALECT, **schema, "title": title, "description": description}


def sop_json_schema() -> dict[str, Any]:
    """JSON Schema of an SOP file, ``sops/<institution>/<sop_id>.yaml``."""
    return _schema(
        SopDefinition,
        "sopflow SOP definition",
        "One SOP revision: sops/<institution>/<sop_id>.yaml; the id must equal the file name.",
    )


def institution_json_schema() -> dict[str, Any]:
    """JSON Schema of ``sops/<institution>/institution.yaml``."""
    return _schema(
        InstitutionSpec,
        "sopflow institution",
        "sops/<institution>/institution.yaml: name, zone, roles.",
    )


def products_json_schema() -> dict[str, Any]:
    """JSON Schema of ``sops/<institution>/products.yaml``."""
    return _schema(
        ProductCatalogSpec,
        "sopflow product catalogue",
        "sops/<institution>/products.yaml.",
    )


SCHEMA_KINDS = {
    "sop": sop_json_schema,
    "institution": institution_json_schema,
    "products": products_json_schema,
}
"""Which schema ``sopflow sop schema --kind`` writes."""
