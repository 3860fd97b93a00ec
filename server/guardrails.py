"""Guardrails: hooks on a request's input and on its output stream, configured per tenant.

A `Guard` has two hooks: `check_input(texts)` sees the prompt or message texts before the
model does (it may rewrite them or refuse the request with a 400 `content_filter`), and
`output_filter()` makes a per-choice filter that the output stream passes through. Built in:
- `PIIGuard`: redacts PII in the output (and optionally the input), exactly as if the whole
  text had been redacted at once, however the stream is chunked (see server/pii.py).
- `BlocklistGuard`: case-insensitive phrases; in the input a 400, in the output the choice
  stops before the phrase with `finish_reason: "content_filter"` (and the engine request is
  aborted once every choice has stopped).
`GuardChain` runs a tenant's guards in order and counts every action through `on_action`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import regex

from engine.outputs import RequestOutput
from server.config_file import GuardConfig
from server.errors import APIError
from server.pii import StreamRedactor, redact
from server.protocol import ChatCompletionRequest, GenerationRequest


@dataclass
class Filtered:
    text: str  # safe to release now
    blocked: bool = False
    redactions: int = 0


class OutputFilter(Protocol):
    def feed(self, chunk: str, final: bool) -> Filtered: ...


class Guard(Protocol):
    name: str

    def check_input(self, texts: list[str]) -> tuple[list[str], int]:
        """(possibly rewritten texts, number of actions); raises APIError to refuse."""
        ...

    def output_filter(self) -> OutputFilter: ...


@dataclass
class _PIIFilter:
    redactor: StreamRedactor

    def feed(self, chunk: str, final: bool) -> Filtered:
        before = self.redactor.redactions
        text = self.redactor.feed(chunk, final)
        return Filtered(text, redactions=self.redactor.redactions - before)


@dataclass
class PIIGuard:
    name: str
    kinds: tuple[str, ...]
    redact_input: bool = False

    def check_input(self, texts: list[str]) -> tuple[list[str], int]:
        if not self.redact_input:
            return texts, 0
        results = [redact(t, self.kinds) for t in texts]
        return [r[0] for r in results], sum(r[1] for r in results)

    def output_filter(self) -> OutputFilter:
        return _PIIFilter(StreamRedactor(self.kinds))


@dataclass
class _BlockFilter:
    pattern: regex.Pattern
    _pending: str = ""

    def feed(self, chunk: str, final: bool) -> Filtered:
        text = self._pending + chunk
        hit = self.pattern.search(text)
        if hit is not None:
            self._pending = ""
            return Filtered(text[:hit.start()], blocked=True)
        hold = len(text)
        if not final:  # hold back only a tail that could still become a blocked phrase
            for pos in range(len(text)):
                if self.pattern.fullmatch(text, pos, partial=True):
                    hold = pos
                    break
        self._pending = text[hold:]
        return Filtered(text[:hold])


@dataclass
class BlocklistGuard:
    name: str
    terms: list[str]
    check_inputs: bool = True
    pattern: regex.Pattern = field(init=False)

    def __post_init__(self) -> None:
        if not self.terms or not all(isinstance(t, str) and t for t in self.terms):
            raise ValueError(f"guards.{self.name}.terms must be a non-empty list of phrases")
        self.pattern = regex.compile("|".join(regex.escape(t) for t in self.terms), regex.I)

    def check_input(self, texts: list[str]) -> tuple[list[str], int]:
        if self.check_inputs and any(self.pattern.search(t) for t in texts):
            raise APIError(400, "The request was refused by the content filter.",
                           code="content_filter")
        return texts, 0

    def output_filter(self) -> OutputFilter:
        return _BlockFilter(self.pattern)


def build_guard(name: str, cfg: GuardConfig) -> Guard:
    if cfg.type == "pii":
        return PIIGuard(name, tuple(cfg.kinds), cfg.redact_input)
    return BlocklistGuard(name, list(cfg.terms), cfg.check_input)


@dataclass
class GuardChain:
    guards: list[Guard]
    on_action: Callable[[str, str, int], None] = lambda guard, action, count: None

    def check_input(self, texts: list[str]) -> list[str]:
        for g in self.guards:
            try:
                texts, actions = g.check_input(texts)
            except APIError:
                self.on_action(g.name, "block_input", 1)
                raise
            if actions:
                self.on_action(g.name, "redact_input", actions)
        return texts

    def check_request(self, req: GenerationRequest) -> None:
        """Refuses what output guards could not cover (logprobs carry raw token strings), then
        runs the input guards over the prompt or message texts, writing back any rewrite."""
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not available to tenants with output guardrails.",
                           param="logprobs", code="unsupported")
        if isinstance(req, ChatCompletionRequest):
            texts = self.check_input([m["content"] for m in req.messages])
            req.messages = [{**m, "content": t} for m, t in zip(req.messages, texts)]
        elif isinstance(req.prompt, str):
            req.prompt = self.check_input([req.prompt])[0]

    def _feed(self, filters: list[OutputFilter], chunk: str, final: bool) -> Filtered:
        blocked = False
        for g, f in zip(self.guards, filters):
            result = f.feed(chunk, final or blocked)
            if result.redactions:
                self.on_action(g.name, "redact_output", result.redactions)
            if result.blocked and not blocked:
                self.on_action(g.name, "block_output", 1)
            chunk, blocked = result.text, blocked or result.blocked
        return Filtered(chunk, blocked)

    async def wrap(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """The stream with each choice's text passed through the guards. Texts stay cumulative;
        a blocked choice finishes with finish_reason "content_filter"."""
        filters: dict[int, list[OutputFilter]] = {}
        raw_seen: dict[int, int] = {}
        released: dict[int, str] = {}
        stopped: set[int] = set()
        try:
            async for out in stream:
                outputs = []
                for c in out.outputs:
                    i = c.index
                    if i in stopped:
                        outputs.append(dataclasses.replace(c, text=released[i], finish_reason="content_filter",
                                                           stop_reason=None))
                        continue
                    fs = filters.setdefault(i, [g.output_filter() for g in self.guards])
                    chunk = c.text[raw_seen.get(i, 0):]
                    raw_seen[i] = max(raw_seen.get(i, 0), len(c.text))
                    result = self._feed(fs, chunk, c.finished)
                    released[i] = released.get(i, "") + result.text
                    if result.blocked:
                        stopped.add(i)
                        c = dataclasses.replace(c, finish_reason="content_filter", stop_reason=None)
                    outputs.append(dataclasses.replace(c, text=released[i]))
                finished = out.finished or all(c.finish_reason is not None for c in outputs)
                yield dataclasses.replace(out, outputs=outputs, finished=finished)
                if finished:
                    return
        finally:
            await stream.aclose()
