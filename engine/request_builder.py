"""`RequestBuilder`: an API call (id, prompt, parameters) turned into the engine's `Request`s.

Guarantees: a request that can never run is refused here, before anything is queued, with a
ValueError naming the problem (an empty, reused or clashing request id, a non-integer
priority, an empty prompt or token ids outside the vocabulary, prompt + max_tokens past the
model's context or the KV cache's capacity). It changes no engine state: the caller queues
what it returns. An `n > 1` request becomes `n` sequences ``id#0`` .. ``id#n-1``; seeded
sequence ``i`` samples from its own generator seeded ``seed + i``.
"""
from __future__ import annotations

import time
from collections.abc import Container
from typing import Any

import torch

from engine.generation_config import GenerationDefaults
from engine.pooling import PoolingParams, PoolingState
from engine.request import Request
from engine.sampling_params import SamplingParams

Lora = tuple[str | None, int | None]  # (adapter name, engine uid); (None, None): the base model


class RequestBuilder:
    """Knows the model's limits (vocabulary, context, KV cache capacity in tokens), its
    tokenizer (None: prompts must be token ids) and its sampling defaults."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, kv_capacity: int,
                 device: torch.device, sampling_defaults: GenerationDefaults, config: Any):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_capacity = kv_capacity
        self.device = device
        self.sampling_defaults = sampling_defaults
        self.config = config  # the engine's: caps that `GenerationDefaults.prepare` applies

    def generation(self, request_id: str, prompt: str | list[int], params: SamplingParams | None,
                   arrival_time: float | None, priority: int, cache_salt: str | None, tenant: str | None,
                   lora: Lora, *, groups: Container[str], live: Container[str]) -> tuple[str | None, list[Request]]:
        """(the prompt's text or None, the request's sequences). ``groups``: ids of requests
        with outputs still to come; ``live``: ids of the scheduler's sequences."""
        params = self.sampling_defaults.prepare(params, self.vocab_size, self.config)
        _check_id(request_id, groups)
        _check_priority(priority)
        prompt_text, prompt_ids = self.tokenize(prompt)
        max_tokens = self.max_tokens(len(prompt_ids), params)
        arrival = time.time() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            if child_id in live:
                raise ValueError(f"request_id {request_id!r} clashes with the running request {child_id!r}")
            children.append(Request(child_id, prompt_ids, params, max_tokens, arrival, priority,
                                    cache_salt, tenant, generator, lora_name=lora[0], lora_id=lora[1]))
        return prompt_text, children

    def pooling(self, request_id: str, prompt: str | list[int], params: PoolingParams,
                arrival_time: float | None, priority: int, cache_salt: str | None, tenant: str | None,
                lora: Lora, *, groups: Container[str], live: Container[str]) -> tuple[str | None, Request]:
        """An embedding request: prefill only (engine/pooling.py), then it finishes."""
        _check_id(request_id, groups)
        if request_id in live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        _check_priority(priority)
        prompt_text, prompt_ids = self.tokenize(prompt)
        limit, capacity = self.max_model_len, self.kv_capacity
        if len(prompt_ids) > min(limit, capacity):
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, your input has "
                             f"{len(prompt_ids)} tokens." if len(prompt_ids) > limit else
                             f"input ({len(prompt_ids)} tokens) exceeds the KV cache capacity of {capacity} tokens")
        arrival = time.time() if arrival_time is None else arrival_time
        request = Request(request_id, prompt_ids, SamplingParams(max_tokens=1), 0, arrival, priority,
                          cache_salt, tenant, pooling=PoolingState(params), lora_name=lora[0], lora_id=lora[1])
        return prompt_text, request

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(the text or None, the token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt must be token ids: this engine was started without a tokenizer")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
            vocab = self.vocab_size
            bad = [t for t in ids if t < 0 or t >= vocab]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[0]}")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt must not be empty")
        return text, ids

    def max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        """The request's completion budget: ``params.max_tokens``, or all the context left."""
        limit = self.max_model_len
        capacity = self.kv_capacity
        if num_prompt >= limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{num_prompt} tokens, leaving no room for completion tokens."
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the prompt or max_tokens."
            )
        if num_prompt + max_tokens > capacity:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the KV cache capacity "
                f"of {capacity} tokens; raise num_blocks/kv_cache_memory or lower max_tokens"
            )
        return max_tokens


def _check_id(request_id: str, groups: Container[str]) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("request_id must be a non-empty string")
    if request_id in groups:
        raise ValueError(f"request_id {request_id!r} is already in use")


def _check_priority(priority: int) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
