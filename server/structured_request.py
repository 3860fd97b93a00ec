"""The request forms that constrain output, parsed into one `StructuredOutputsParams`.

Accepted (at most one of them per request, else 400):

* OpenAI `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
* vLLM `structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}`;
* vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

Errors are 400s whose `param` is the field as the client spelled it (e.g.
`response_format.json_schema.schema`, `guided_regex`). Only cheap checks happen here; the
grammar compiles on the engine's worker thread and the server awaits it before queueing the
request (server/serving.py), so a constraint xgrammar refuses is also a 400 before it joins.
"""
from __future__ import annotations

from typing import Any

from engine.errors import InvalidParameterError, show
from engine.structured_output import StructuredOutputsParams
from server.errors import bad_request

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


def _make(param: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(param=param, **kwargs)
    except InvalidParameterError as exc:
        raise bad_request(str(exc), exc.param) from None


def _response_format(value: Any) -> StructuredOutputsParams | None:
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _make("response_format", json_object=True)
    if kind == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format.json_schema must be an object with name and schema",
                              "response_format.json_schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request("response_format.json_schema.name must be a string", "response_format.json_schema.name")
        schema = js.get("schema")
        # OpenAI: no schema means any JSON object
        return _make("response_format.json_schema.schema", json={"type": "object"} if schema is None else schema)
    raise bad_request(f"response_format.type must be one of text, json_object, json_schema, got {show(kind)}",
                      "response_format.type")


def parse_structured(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The request's output constraint, or None. Raises APIError 400 naming the field."""
    found: list[tuple[str, StructuredOutputsParams | None]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _response_format(body["response_format"])))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        given = [k for k in STRUCTURED_KINDS if so.get(k) is not None]
        if len(given) != 1:
            raise bad_request(f"structured_outputs must set exactly one of {', '.join(STRUCTURED_KINDS)}",
                              "structured_outputs")
        found.append(("structured_outputs", _make(f"structured_outputs.{given[0]}", **{given[0]: so[given[0]]})))
    for name, kind in GUIDED.items():
        if body.get(name) is not None:
            found.append((name, _make(name, **{kind: body[name]})))
    constraints = [(n, s) for n, s in found if s is not None]
    if len(constraints) > 1:
        raise bad_request(f"give only one of {', '.join(n for n, _ in constraints)}", constraints[1][0])
    return constraints[0][1] if constraints else None
