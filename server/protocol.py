"""Request models of the OpenAI-compatible API, parsed and validated from JSON bodies.

Every wrong type or range raises `APIError(400)` naming the field in `param`. Unknown fields
are ignored (clients send many); known OpenAI fields we cannot honour are rejected, not
silently dropped, so a client never gets a result that quietly ignores what it asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.errors import show
from engine.sampling_params import SEED_RANGE
from server.errors import bad_request
from server.json_fields import JsonFields, token_id_list
from server.structured_request import parse_structured
from server.tool_request import ToolsRequest, parse_tools

MAX_N = 128
MAX_LOGPROBS = 20
INT64 = (-(2 ** 63), 2 ** 63 - 1)  # bounds of integer fields that have no tighter ones
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class GenerationRequest:
    """Fields shared by completions and chat completions. `sampling` holds keyword arguments
    for `SamplingParams` (without max_tokens: the server resolves it against the context)."""

    model: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    priority: int
    user: str | None
    timeout: float | None
    logprobs: int | None  # top-n per token; None = no logprobs
    sampling: dict[str, Any] = field(default_factory=dict)


def _common(f: JsonFields, max_tokens_names: tuple[str, ...]) -> dict[str, Any]:
    for name in ("suffix", "functions", "echo"):
        f.reject_unsupported(name)
    n = f.integer("n", 1, 1, MAX_N)
    best_of = f.integer("best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise bad_request("best_of different from n is not supported", "best_of", code="unsupported")
    max_tokens = None
    for name in max_tokens_names:  # each is validated; the first one given wins
        value = f.integer(name, None, 1, INT64[1])
        max_tokens = value if max_tokens is None else max_tokens
    stream_options = f.body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        include_usage = JsonFields(stream_options, "stream_options").boolean("include_usage")
    user = f.string("user")
    sampling = {
        "n": n,
        # None (unset): the model's default from its generation_config applies
        "temperature": f.number("temperature", None, 0.0, 2.0),
        "top_p": f.number("top_p", None, 0.0, 1.0),
        "top_k": f.integer("top_k", None, -1, INT64[1]),
        "min_p": f.number("min_p", None, 0.0, 1.0),
        "seed": f.integer("seed", None, *SEED_RANGE),
        "presence_penalty": f.number("presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": f.number("frequency_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": f.number("repetition_penalty", None, 0.0),
        "stop": f.stop(),
        "stop_token_ids": f.int_list("stop_token_ids"),
        "logit_bias": f.logit_bias(),
        "allowed_token_ids": f.int_list("allowed_token_ids"),
        "ignore_eos": f.boolean("ignore_eos"),
        "min_tokens": f.integer("min_tokens", 0, 0, INT64[1]),
        "include_stop_str_in_output": f.boolean("include_stop_str_in_output"),
        "skip_special_tokens": f.boolean("skip_special_tokens", True),
        "structured_outputs": parse_structured(f.body),
    }
    if sampling["allowed_token_ids"] == []:
        raise bad_request("allowed_token_ids must not be empty", "allowed_token_ids")
    if sampling["top_p"] == 0.0:
        raise bad_request("top_p must be greater than 0", "top_p")
    return {
        "model": f.string("model"),
        "max_tokens": max_tokens,
        "stream": f.boolean("stream"),
        "include_usage": include_usage,
        "priority": f.integer("priority", 0, *INT64),
        "user": user,
        "timeout": f.number("timeout", None, 0.001),
        "sampling": sampling,
    }


@dataclass
class CompletionRequest(GenerationRequest):
    prompt: str | list[int] = ""

    @classmethod
    def from_json(cls, body: Any) -> "CompletionRequest":
        f = JsonFields(body)
        f.reject_unsupported("tools")  # tools are a chat feature
        common = _common(f, ("max_tokens",))
        logprobs = f.integer("logprobs", None, 0, MAX_LOGPROBS)
        return cls(prompt=_prompt(body.get("prompt")), logprobs=logprobs, **common)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise bad_request("prompt must not be empty", "prompt")
        return value
    ids = token_id_list(value)
    if ids:
        return ids
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise bad_request("batched prompts are not supported: send one prompt per request",
                          "prompt", code="unsupported")
    raise bad_request("prompt must be a non-empty string or a non-empty list of token ids", "prompt")


@dataclass
class ChatCompletionRequest(GenerationRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)
    add_generation_prompt: bool = True
    tools: ToolsRequest | None = None  # server/tool_request.py

    @classmethod
    def from_json(cls, body: Any) -> "ChatCompletionRequest":
        f = JsonFields(body)
        common = _common(f, ("max_completion_tokens", "max_tokens"))
        top_logprobs = f.integer("top_logprobs", None, 0, MAX_LOGPROBS)
        want_logprobs = f.boolean("logprobs")
        if top_logprobs and not want_logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        logprobs = (top_logprobs or 0) if want_logprobs else None
        tools = parse_tools(body)
        forced = tools.constraint() if tools is not None else None
        if forced is not None:  # "required" or a named function: the output must be a call
            if common["sampling"]["structured_outputs"] is not None:
                raise bad_request("tool_choice forcing a tool call cannot be combined with response_format "
                                  "or structured_outputs", "tool_choice")
            common["sampling"]["structured_outputs"] = forced
        return cls(messages=_messages(body.get("messages")), logprobs=logprobs, tools=tools,
                   add_generation_prompt=f.boolean("add_generation_prompt", True), **common)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list of message objects", "messages")
    out = []
    for i, msg in enumerate(value):
        name = f"messages[{i}]"
        f = JsonFields(msg, name)
        role = f.string("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{name}.role must be one of {', '.join(CHAT_ROLES)}, got {show(role)}",
                              f"{name}.role")
        message: dict[str, Any] = {"role": role, "content": _content(msg.get("content"), f"{name}.content")}
        if msg.get("tool_calls") is not None:
            calls = _tool_calls(msg["tool_calls"], f"{name}.tool_calls")
            if role == "assistant" and calls:
                message["tool_calls"] = calls
        tool_call_id = f.string("tool_call_id")
        if role == "tool":
            message["tool_call_id"] = tool_call_id or ""
        if f.string("name") is not None:
            message["name"] = msg["name"]
        out.append(message)
    return out


def _tool_calls(value: Any, name: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, for the chat template: arguments that are a JSON
    string become an object (templates render them with `tojson`)."""
    import json  # noqa: PLC0415

    if not isinstance(value, list):
        raise bad_request(f"{name} must be a list of tool calls", name)
    out = []
    for j, call in enumerate(value):
        c = JsonFields(call, f"{name}[{j}]")
        fn = JsonFields(call.get("function"), f"{name}[{j}].function")
        if c.string("type", "function") != "function":
            raise bad_request(f"{name}[{j}].type must be function", f"{name}[{j}].type")
        call_id, fn_name, args = c.string("id"), fn.string("name"), fn.string("arguments", "{}")
        if fn_name is None:
            raise bad_request(f"{name}[{j}].function.name is required", f"{name}[{j}].function.name")
        try:
            parsed: Any = json.loads(args) if args.strip() else {}
        except ValueError:
            parsed = args  # left as the string the client sent
        out.append({"id": call_id, "type": "function", "function": {"name": fn_name, "arguments": parsed}})
    return out


def _content(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{name}[{j}] must be a text part: only text content is supported",
                                  f"{name}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{name} must be a string or a list of text parts", name)


@dataclass
class TokenizeRequest:
    """`/tokenize`: either `prompt` (a string) or chat `messages`."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    add_special_tokens: bool

    @classmethod
    def from_json(cls, body: Any) -> "TokenizeRequest":
        f = JsonFields(body)
        prompt = f.string("prompt")
        messages = _messages(body["messages"]) if body.get("messages") is not None else None
        if (prompt is None) == (messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        return cls(model=f.string("model"), prompt=prompt, messages=messages,
                   add_special_tokens=f.boolean("add_special_tokens", True))


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int]

    @classmethod
    def from_json(cls, body: Any) -> "DetokenizeRequest":
        f = JsonFields(body)
        tokens = f.int_list("tokens")
        if tokens is None:
            raise bad_request("tokens is required: a list of token ids", "tokens")
        return cls(model=f.string("model"), tokens=tokens)
