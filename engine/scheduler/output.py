"""The two messages of one engine step: what the scheduler asks the runner to compute
(`SchedulerOutput`), and what the runner sampled (`SampledTokens`).

`SchedulerOutput` is the only thing the model runner learns about requests: it never sees the
scheduler's queues, the `Request` objects or the KV cache manager.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class ScheduledRequest:
    """One sequence's work in a step.

    ``token_ids`` are fed at positions ``num_computed_tokens ..``; the K/V of the positions
    before are already in the cache. ``block_ids`` is the sequence's whole block table and
    covers ``num_computed_tokens + len(token_ids)`` tokens. ``sample`` is True when the step
    reaches the sequence's last known token, so the runner samples its next token (a prefill
    chunk that stops short of the end of the prompt does not). ``prompt_token_ids`` and
    ``output_token_ids`` are the request's own lists (read-only, for penalties), valid until
    ``update_from_output``.
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: "torch.Generator | None" = None
    pooling: str | None = None  # an embedding request's pooling method: pool, never sample
    grammar: Any = None  # the sequence's GrammarState when its output is constrained (structured output)
    lora_id: int | None = None  # the engine uid of its LoRA adapter (engine/lora/); None = base model

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step's work: the scheduled sequences in admission order (running ones first), and
    the ids of requests preempted while building it."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledTokens:
    """The runner's answer: one token per sequence of the step whose ``sample`` was True, in
    ``request_ids`` order. ``logprobs[i]`` (chosen token + top-n, raw distribution) and
    ``chosen_logprobs[i]`` are read only for requests that asked for logprobs. ``pooled``
    maps each pooling sequence of the step to its chunk's part (engine/pooling.py)."""

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float] | None] | None = None
    chosen_logprobs: list[float] | None = None
    pooled: dict[str, "torch.Tensor"] = field(default_factory=dict)
