"""Request bodies checked against Google's own API descriptions (discovery documents).

google-api-python-client ships the discovery document of every Google API
(``googleapiclient/discovery_cache/documents/<api>.<version>.json``): each resource's fields,
their JSON types and formats, and the values every enum allows. The cloud stubs
(tests/fakes/compute.py, tests/fakes/batch.py) run each request body through :func:`problems`
and answer 400 where the real API would refuse it: an unknown field, a wrong type, a value
outside an enum. google-cloud-compute's messages hold enums as plain strings, so nothing else
checks that a ``provisioningModel`` or a disk type's enum value exists.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"^-?\d+(\.\d{1,9})?s$")


@functools.cache
def document(api: str) -> dict[str, Any]:
    """The discovery document of ``api`` (``compute.v1``, ``batch.v1``)."""
    import googleapiclient

    path = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / f"{api}.json"
    return json.loads(path.read_text())


def problems(api: str, schema: str, body: Any) -> list[str]:
    """Every way ``body`` breaks the discovery document's ``schema`` (empty: it conforms)."""
    doc = document(api)
    out: list[str] = []
    _check(doc["schemas"], {"$ref": schema}, body, schema, out)
    return out


def _check(schemas: dict[str, Any], prop: dict[str, Any], value: Any, at: str, out: list[str]):
    if "$ref" in prop:
        prop = schemas[prop["$ref"]]
    kind = prop.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            out.append(f"{at}: expected an object, got {type(value).__name__}")
            return
        fields = prop.get("properties", {})
        extra = prop.get("additionalProperties")
        for key, item in value.items():
            if key in fields:
                _check(schemas, fields[key], item, f"{at}.{key}", out)
            elif extra is not None:
                _check(schemas, extra, item, f"{at}[{key!r}]", out)
            else:
                out.append(f"{at}: unknown field {key!r}")
    elif kind == "array":
        if not isinstance(value, list):
            out.append(f"{at}: expected an array, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(schemas, prop["items"], item, f"{at}[{i}]", out)
    elif kind == "string":
        fmt = prop.get("format")
        if fmt in ("int64", "uint64"):  # proto3 JSON: a decimal string, or a number
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value))
            ):
                out.append(f"{at}: expected an {fmt} (decimal string), got {value!r}")
            return
        if "enum" in prop and isinstance(value, int) and not isinstance(value, bool):
            # proto3 JSON: an enum by number (the REST clients send them so), in the
            # document's order (the proto's numbering)
            if not 0 <= value < len(prop["enum"]):
                out.append(f"{at}: {value} is not an enum number of {prop['enum']}")
            return
        if not isinstance(value, str):
            out.append(f"{at}: expected a string, got {type(value).__name__} {value!r}")
            return
        if fmt == "google-duration" and not _DURATION.match(value):
            out.append(f"{at}: expected a duration like '3600s', got {value!r}")
        if "enum" in prop and value not in prop["enum"]:
            out.append(f"{at}: {value!r} is not one of {prop['enum']}")
    elif kind == "integer":
        number = isinstance(value, int) and not isinstance(value, bool)
        if not number and not (isinstance(value, str) and re.fullmatch(r"-?\d+", value)):
            out.append(f"{at}: expected an integer, got {value!r}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            out.append(f"{at}: expected a number, got {value!r}")
    elif kind == "boolean" and not isinstance(value, bool):
        out.append(f"{at}: expected a boolean, got {value!r}")
