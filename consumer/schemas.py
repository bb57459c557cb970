"""JSON Schemas of pydantic models laid out as document components.

The AsyncAPI and OpenAPI documents both keep every model once under
``#/components/schemas`` and point at it, as their tools expect; this is the
one place that lays them out.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


def component_schemas(
    models: list[type[BaseModel]], mode: JsonSchemaMode = "validation"
) -> tuple[dict[type[BaseModel], dict[str, Any]], dict[str, Any]]:
    """``({model: {"$ref": ...}}, {name: schema})`` for ``models`` and every model they use."""
    refs, top = models_json_schema([(model, mode) for model in models], ref_template=REF_TEMPLATE)
    return {model: refs[(model, mode)] for model in models}, top.get("$defs", {})
