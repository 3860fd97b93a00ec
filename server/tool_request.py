"""The tool-calling fields of a chat request: `tools`, `tool_choice`, `parallel_tool_calls`.

`parse_tools` validates them (400 naming the field). `ToolsRequest.constraint()` is the
structured-output constraint that `"required"` and a named function impose, so the model's
output is a valid call whatever the model (a JSON array of `{"name", "parameters"}` objects,
or the named function's arguments object); `"auto"` adds none. `ToolsRequest.parser(default)`
is the parser that reads the calls back out of the text (None for `"none"`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import show
from engine.structured_output import StructuredOutputsParams
from server.errors import bad_request
from server.tool_parsers import NamedFunctionParser, make_parser
from server.tool_parsers.json_array import JsonArrayToolParser

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolsRequest:
    tools: list[dict[str, Any]]  # OpenAI's objects, as sent (for the chat template)
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the named function of a {"type": "function"} choice
    parallel: bool = True

    def schema(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or ANY_OBJECT

    def constraint(self) -> StructuredOutputsParams | None:
        if self.choice == "function":
            return StructuredOutputsParams(json=self.schema(self.function), param="tool_choice")
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                   "parameters": self.schema(t["function"]["name"])},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema, param="tools")

    def parser(self, default: str) -> Any:
        """A fresh parser for one choice (None when the output is plain content)."""
        if self.choice == "none":
            return None
        if self.choice == "function":
            return NamedFunctionParser(self.function)
        if self.choice == "required":
            return JsonArrayToolParser()
        return make_parser(default)


def _tool(value: Any, i: int) -> dict[str, Any]:
    name = f"tools[{i}]"
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(value.get("function"), dict):
        raise bad_request(f'{name} must be {{"type": "function", "function": {{...}}}}', name)
    fn = value["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request(f"{name}.function.name must be a non-empty string", f"{name}.function.name")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise bad_request(f"{name}.function.parameters must be a JSON schema object",
                              f"{name}.function.parameters")
        StructuredOutputsParams(json=params, param=f"{name}.function.parameters")  # 400 if not a schema
    return value


def parse_tools(body: dict[str, Any]) -> ToolsRequest | None:
    """None when the request has no tools (and no tool_choice other than none/auto)."""
    from engine.errors import InvalidParameterError  # noqa: PLC0415

    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of function tools", "tools")
    try:
        tools = [_tool(t, i) for i, t in enumerate(tools)]
    except InvalidParameterError as exc:
        raise bad_request(str(exc), exc.param) from None
    names = [t["function"]["name"] for t in tools]
    function = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request('tool_choice must be "none", "auto", "required" or '
                              '{"type": "function", "function": {"name": ...}}', "tool_choice")
        if fn["name"] not in names:
            raise bad_request(f"tool_choice names the function {show(fn['name'])}, which is not in tools",
                              "tool_choice.function.name")
        choice, function = "function", fn["name"]
    elif choice not in ("none", "auto", "required"):
        raise bad_request(f'tool_choice must be "none", "auto", "required" or a function, got {show(choice)}',
                          "tool_choice")
    return ToolsRequest(tools, choice, function, True if parallel is None else parallel)
