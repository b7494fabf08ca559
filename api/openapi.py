"""The app's OpenAPI document, as clients and fuzzers need it."""

from __future__ import annotations

_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                    "multipleOf")


def integer_bounds(node):
    """FastAPI's OpenAPI model holds bounds as floats (`maximum: 1.15e+18`,
    `multipleOf: 512.0`): give an integer schema's bounds back as integers,
    as pydantic wrote them, so clients and fuzzers generate integers."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in _NUMBER_KEYWORDS:
                v = node.get(k)
                if isinstance(v, float) and v.is_integer():
                    node[k] = int(v)
        if isinstance(node.get("multipleOf"), float) and node["multipleOf"].is_integer() \
                and any(s.get("type") == "integer" for s in node.get("anyOf", ())):
            node["multipleOf"] = int(node["multipleOf"])  # `int | None` puts it outside
        for v in node.values():
            integer_bounds(v)
    elif isinstance(node, list):
        for v in node:
            integer_bounds(v)
    return node
