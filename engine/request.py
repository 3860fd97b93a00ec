"""One sequence being generated: its tokens, how many of them have K/V in the cache, and its
status.

A request has ``num_tokens`` tokens (prompt + generated so far) of which the first
``num_computed_tokens`` have their K/V in the cache. Scheduling is nothing but letting
``num_computed_tokens`` catch up with ``num_tokens``: a fresh prompt catches up over one or more
steps (chunked prefill), a running request catches up one token per step (decode), and a
preempted request restarts from zero (recompute), keeping the tokens it already generated.

This module sits below both the scheduler and the KV cache: it imports neither, and the KV cache
never sees a `Request` (it is handed request ids and token ids).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from engine.structured_output.grammar_state import GrammarState

    from engine.pooling import PoolingState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine step that ran it failed

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None here
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    tenant: str | None = None
    generator: "torch.Generator | None" = None
    # set for an embedding request: prefill only, never samples, finishes with its pooled vector
    pooling: "PoolingState | None" = None
    # the LoRA adapter it runs with (engine/lora/): its name, and the engine's uid of that load
    lora_name: str | None = None
    lora_id: int | None = None

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    seq_no: int = 0  # admission tie-breaker, set by the scheduler
    lora_passed: int = 0  # times later requests were admitted past it while its adapter had no slot
    # structured output: this sequence's grammar state (engine/structured_output/), else None
    grammar: "GrammarState | None" = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def remaining_tokens(self) -> int:
        """Tokens still to be processed or generated: a simple size estimate for policies."""
        return self.num_tokens - self.num_computed_tokens + self.max_tokens - self.num_output_tokens

    @property
    def prefix_salt(self) -> object:
        """What its KV blocks' hashes are salted with: the cache salt (tenant) and, with an
        adapter, the adapter's uid, so KV computed under one adapter is never reused under
        another (or under the base model)."""
        return self.cache_salt if self.lora_id is None else (self.cache_salt, "lora", self.lora_id)

    def is_ready(self) -> bool:
        """False while the request's grammar is still compiling: the scheduler does not admit it
        yet (and lets the requests behind it pass)."""
        return self.grammar is None or self.grammar.is_ready()

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
