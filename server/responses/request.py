"""A `POST /v1/responses` body -> the chat request the pipeline runs, plus what the response
object echoes back.

The Responses API is served statelessly on top of chat completions: `instructions` becomes a
system message, `input` (a string, or a list of message / `function_call` /
`function_call_output` items) becomes chat messages, `max_output_tokens` becomes `max_tokens`,
`text.format` becomes `response_format`, flat function `tools` and `tool_choice` become chat
tools. The chat parser (server/protocol.py, with the structured-output and tool machinery) then
validates the result exactly as it would a chat request; its errors are renamed to the
Responses field (`param`) the client sent.

Refused with 400 naming the field: `previous_response_id` and `conversation` (no server-side
state), `background`, `prompt` templates, `reasoning`, `include`, `top_logprobs`,
`truncation: "auto"`, non-function tools, and input items or content parts other than text,
function calls and their outputs. `store: true` (OpenAI's default) is accepted but nothing is
stored: the response says `"store": false`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.errors import show
from server.errors import APIError, bad_request
from server.protocol import ChatCompletionRequest

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
# engine and vLLM extras passed through unchanged, as on the chat endpoint
PASSTHROUGH = ("model", "temperature", "top_p", "user", "stream", "seed", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
               "priority", "timeout", "skip_special_tokens", "include_stop_str_in_output", "parallel_tool_calls")
UNSUPPORTED = {
    "previous_response_id": "previous_response_id is not supported: this server stores no responses; send the "
                            "whole conversation in input",
    "conversation": "conversation is not supported: this server stores no conversations; send the whole "
                    "conversation in input",
    "background": "background responses are not supported",
    "prompt": "prompt templates are not supported",
    "reasoning": "reasoning options are not supported",
    "include": "include is not supported",
    "top_logprobs": "top_logprobs is not supported on /v1/responses",
    "max_tool_calls": "max_tool_calls is not supported",
}


@dataclass
class ResponsesRequest(ChatCompletionRequest):
    """The chat request to run; `echo` holds the Responses fields the response object repeats."""

    echo: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_responses(cls, body: Any) -> "ResponsesRequest":
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        for name, why in UNSUPPORTED.items():
            if body.get(name) not in (None, False, [], {}):
                raise bad_request(why, name, code="unsupported")
        if body.get("truncation") not in (None, "disabled"):
            raise bad_request('truncation must be "disabled": inputs are never truncated', "truncation",
                              code="unsupported")
        if body.get("store") is not None and not isinstance(body["store"], bool):
            raise bad_request(f"store must be a boolean, got {show(body['store'])}", "store")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise bad_request("metadata must be an object of string values", "metadata")
        chat: dict[str, Any] = {k: body[k] for k in PASSTHROUGH if k in body}
        messages, origins = _messages(body.get("input"), body.get("instructions"))
        chat["messages"] = messages
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        fmt = _text_format(body.get("text"))
        if fmt is not None:
            chat["response_format"] = fmt
        tools = _tools(body.get("tools"))
        if tools is not None:
            chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
        try:
            req = cls.from_json(chat)
        except APIError as exc:
            exc.param = rename_param(exc.param, origins)
            raise
        req.echo = {k: body.get(k) for k in ("instructions", "max_output_tokens", "temperature", "top_p",
                                             "tool_choice", "parallel_tool_calls", "user", "metadata")}
        req.echo.update(tools=body.get("tools") or [], text={"format": body.get("text", {}).get("format")
                                                              if isinstance(body.get("text"), dict) else None})
        return req


def rename_param(param: str | None, origins: list[str] | None = None) -> str | None:
    """The Responses field a chat field came from (`messages[3]...` -> its input item)."""
    if param is None:
        return None
    if param.startswith("messages"):
        if origins and param.startswith("messages["):
            index = param[len("messages["):].split("]", 1)[0]
            if index.isdigit() and int(index) < len(origins):
                return origins[int(index)]
        return "input"
    for chat, responses in (("response_format.json_schema.schema", "text.format.schema"),
                            ("response_format.json_schema.name", "text.format.name"),
                            ("response_format.json_schema", "text.format"),
                            ("response_format", "text.format"), ("max_tokens", "max_output_tokens"),
                            ("tool_choice.function.name", "tool_choice.name")):
        if param == chat or param.startswith(chat + "."):
            return responses + param[len(chat):]
    if param.startswith("tools[") and ".function." in param:
        return param.replace(".function.", ".", 1)
    return param


def _text(value: Any, name: str) -> str:
    """A message's content as text: a string or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"{name} must be a string or a list of content parts", name)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(f"{name}[{j}] must be an input_text part ({show(kind)} parts are not supported)",
                              f"{name}[{j}]", code="unsupported" if isinstance(kind, str) else None)
        texts.append(part["text"])
    return "".join(texts)


def _messages(value: Any, instructions: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat messages, and for each the Responses field it came from."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request(f"instructions must be a string, got {show(instructions)}", "instructions")
        messages.append({"role": "system", "content": instructions})
        origins.append("instructions")
    if isinstance(value, str):
        if not value:
            raise bad_request("input must not be empty", "input")
        return [*messages, {"role": "user", "content": value}], [*origins, "input"]
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a non-empty string or a non-empty list of input items", "input")
    for i, item in enumerate(value):
        name = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{name} must be an object", name)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise bad_request(f"{name}.role must be one of {', '.join(ROLES)}, got {show(role)}", f"{name}.role")
            if item.get("content") is None:
                raise bad_request(f"{name}.content is required: a string or a list of input_text parts",
                                  f"{name}.content")
            messages.append({"role": role, "content": _text(item["content"], f"{name}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", name), "type": "function",
                    "function": {"name": _string(item, "name", name), "arguments": _arguments(item, name)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and origins[-1].startswith("input["):
                last.setdefault("tool_calls", []).append(call)  # one assistant turn, several calls
                continue
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if output is None:
                raise bad_request(f"{name}.output is required: the function's result as a string", f"{name}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", name),
                             "content": output if isinstance(output, str) else _text(output, f"{name}.output")})
        else:
            raise bad_request(f"{name}.type {show(kind)} is not supported: use message, function_call or "
                              "function_call_output items", f"{name}.type", code="unsupported")
        origins.append(name)
    return messages, origins


def _string(item: dict, key: str, name: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{name}.{key} must be a non-empty string, got {show(value)}", f"{name}.{key}")
    return value


def _arguments(item: dict, name: str) -> str:
    """The call's arguments as the model wrote them (JSON text; kept as sent if it is not)."""
    args = item.get("arguments", "{}")
    if not isinstance(args, str):
        raise bad_request(f"{name}.arguments must be a string, got {show(args)}", f"{name}.arguments")
    return args


def _text_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("text must be an object", "text")
    fmt = value.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise bad_request("text.format.name must be a non-empty string", "text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format.schema must be a JSON schema object", "text.format.schema")
        _check_optional(fmt, "strict", bool, "text.format")
        _check_optional(fmt, "description", str, "text.format")
        return {"type": "json_schema", "json_schema": {"name": fmt["name"], "schema": fmt["schema"],
                                                       "strict": fmt.get("strict")}}
    raise bad_request(f"text.format.type must be text, json_object or json_schema, got {show(kind)}",
                      "text.format.type")


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools must be a list of function tools", "tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"tools[{i}].type must be function ({show(kind)} tools are not supported)",
                              f"tools[{i}].type", code="unsupported" if isinstance(kind, str) else None)
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        _check_optional(tool, "description", str, f"tools[{i}]")
        _check_optional(tool, "strict", bool, f"tools[{i}]")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _check_optional(obj: dict, key: str, kind: type, where: str) -> None:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        what = "a boolean" if kind is bool else "a string"
        raise bad_request(f"{where}.{key} must be {what}, got {show(value)}", f"{where}.{key}")


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    if isinstance(value, dict):
        raise bad_request(f"tool_choice.type must be function, got {show(value.get('type'))}", "tool_choice.type",
                          code="unsupported")
    return value
