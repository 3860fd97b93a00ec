"""Token limits and backpressure, checked before a request reaches the engine.

`resolve_max_tokens` turns the context length and the server caps into either a concrete
`max_tokens` or a 400 whose message matches OpenAI's wording; `default_max_tokens` is the one
place where a missing `max_tokens` gets its value (the rest of the context, capped). `Admission` bounds the requests
(and their prompt tokens) that wait for their first token: past the bound, a 503 with
Retry-After, so overload never turns into an unbounded pile-up.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.errors import APIError, bad_request
from server.settings import ServerSettings


def resolve_max_tokens(prompt_tokens: int, requested: int | None, max_model_len: int,
                       settings: ServerSettings, chat: bool) -> int:
    """The max_tokens to run with; raises APIError(400) when the request cannot fit."""
    where = "in the messages" if chat else "in your prompt"
    cap = settings.max_prompt_tokens
    if cap is not None and prompt_tokens > cap:
        raise bad_request(
            f"The prompt has {prompt_tokens} tokens, more than this server's limit of {cap} "
            f"prompt tokens. Please reduce the length of the {'messages' if chat else 'prompt'}.",
            "messages" if chat else "prompt", code="prompt_too_long")
    if requested is not None and settings.max_tokens_cap is not None and requested > settings.max_tokens_cap:
        raise bad_request(
            f"max_tokens is {requested}, more than this server's limit of "
            f"{settings.max_tokens_cap} tokens per completion.", "max_tokens", code="max_tokens_too_large")
    if requested is not None and requested >= max_model_len:  # too large whatever the prompt
        raise bad_request(
            f"max_tokens is {requested}, but this model's maximum context length is {max_model_len} "
            f"tokens, prompt included. Please reduce max_tokens.", "max_tokens", code="max_tokens_too_large")
    completion = requested if requested is not None else 1
    if prompt_tokens + completion > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + completion} tokens ({prompt_tokens} {where}, "
            f"{completion} in the completion). Please reduce the length of the "
            f"{'messages' if chat else 'prompt'} or completion.",
            "messages" if chat else "prompt", code="context_length_exceeded")
    return requested if requested is not None else default_max_tokens(prompt_tokens, max_model_len, settings)


def default_max_tokens(prompt_tokens: int, max_model_len: int, settings: ServerSettings) -> int:
    """A missing max_tokens: the rest of the context, capped by --max-tokens-cap (at least 1)."""
    remaining = max(1, max_model_len - prompt_tokens)
    return remaining if settings.max_tokens_cap is None else min(remaining, settings.max_tokens_cap)


@dataclass
class Ticket:
    """One admitted request's place in the waiting budget. `release` is idempotent."""

    admission: "Admission"
    tokens: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.waiting_requests -= 1
            self.admission.waiting_tokens -= self.tokens


@dataclass
class Admission:
    """Counts requests admitted but not yet streaming tokens. Used only on the event loop,
    so plain integers suffice."""

    settings: ServerSettings
    waiting_requests: int = 0
    waiting_tokens: int = 0

    def admit(self, tokens: int) -> Ticket:
        s = self.settings
        if self.waiting_requests + 1 > s.max_waiting_requests:
            raise self._busy(f"{self.waiting_requests} requests are already waiting")
        if s.max_waiting_tokens is not None and self.waiting_requests and \
                self.waiting_tokens + tokens > s.max_waiting_tokens:
            raise self._busy(f"{self.waiting_tokens} prompt tokens are already waiting")
        self.waiting_requests += 1
        self.waiting_tokens += tokens
        return Ticket(self, tokens)

    def _busy(self, why: str) -> APIError:
        return APIError(503, f"The server is overloaded ({why}); retry later.",
                        code="server_overloaded", retry_after=self.settings.retry_after_seconds)
