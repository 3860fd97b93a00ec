"""`ToolCallStreamer`: successive parses of a growing text -> OpenAI stream deltas.

Each call of `update(text, final)` returns the delta that brings the client from what it has
to `parser.parse(text, final)`: new content, then per call `{index, id, type, function: {name,
arguments: ""}}` once its name is known, then argument fragments. Because each parse extends
the previous one (server/tool_parsers/base.py), the content and argument fragments a client
concatenates equal the non-streamed result exactly, with nothing duplicated or lost.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallStreamer:
    parser: Any
    content_sent: int = 0
    args_sent: list[int] = field(default_factory=list)  # per announced call
    ids: list[str] = field(default_factory=list)
    content_done: bool = False

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls delta entries) since the previous update."""
        parsed = self.parser.parse(text, final)
        content = ""
        if not self.content_done and len(parsed.content) > self.content_sent:
            content = parsed.content[self.content_sent:]
            self.content_sent = len(parsed.content)
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if index == len(self.ids):
                self.content_done = True  # content is over once a call starts
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                deltas.append({"index": index, "id": self.ids[index], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            fragment = call.arguments[self.args_sent[index]:]
            if fragment:
                self.args_sent[index] = len(call.arguments)
                if deltas and deltas[-1]["index"] == index:  # one entry per call per chunk
                    deltas[-1]["function"]["arguments"] += fragment
                else:
                    deltas.append({"index": index, "function": {"arguments": fragment}})
        return content, deltas
