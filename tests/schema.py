"""Validate gateway output against OpenAI's published OpenAPI schema.

The schemas come from ``tests/fixtures/openai/schemas.json``: the part of
OpenAI's spec (MIT licence; version in the file) that the tests use, cut by
``tests/fixtures/openai/make_subset.py``.

The spec mixes OpenAPI 3.0's ``nullable: true`` into a 3.1 document, which
JSON Schema validators ignore; it is rewritten to ``type: [T, "null"]`` here
so a ``null`` where the spec allows one validates, and nothing else changes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parent / "fixtures" / "openai" / "schemas.json"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items()}
        if out.pop("nullable", False):
            t = out.get("type")
            if isinstance(t, str):
                out["type"] = [t, "null"]
                if "enum" in out:
                    out["enum"] = [*out["enum"], None]
            elif "$ref" in out or "anyOf" in out or "oneOf" in out or "allOf" in out:
                out = {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _registry() -> tuple[Registry, dict[str, Any]]:
    spec = _nullable(json.loads(SPEC.read_text()))
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return Registry().with_resource("urn:openai", resource), spec


def validate(obj: Any, schema_name: str) -> None:
    registry, _ = _registry()
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
