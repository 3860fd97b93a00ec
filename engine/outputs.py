"""What the engine hands back to callers. Outputs are cumulative: each `RequestOutput` of a
request carries all text and tokens generated so far, so a consumer that only needs the newest
one can drop the rest.

Token ids and logprobs are handed out as `PrefixView`s of the request's own append-only lists,
not copies: building an output costs O(1) per sequence instead of O(tokens so far), which made
a stream of n tokens cost O(n^2)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class PrefixView(Sequence):
    """A read-only view of the first ``n`` items of a list that only ever grows by appending.

    It behaves as the list of those items would (indexing, slicing into a new list, iteration,
    ``len``, ``index``, ``==`` against any sequence, ``+`` with a list), and keeps showing the
    same ``n`` items however much the underlying list grows later."""

    __slots__ = ("_data", "_n")

    def __init__(self, data: list, n: int | None = None):
        self._data = data
        self._n = len(data) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._data[: self._n][index]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError("PrefixView index out of range")
        return self._data[index]

    def __iter__(self):
        data = self._data
        for i in range(self._n):
            yield data[i]

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, PrefixView):
            other = other.tolist()
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return self.tolist() == list(other)

    __hash__ = None  # type: ignore[assignment]  # like a list

    def __add__(self, other):
        return self.tolist() + list(other)

    def __radd__(self, other):
        return list(other) + self.tolist()

    def tolist(self) -> list:
        """A plain list copy of the visible items."""
        return self._data[: self._n]

    def __repr__(self) -> str:
        return repr(self.tolist())

    def __reduce__(self):  # pickles (and deep-copies) as a plain list
        return (list, (self.tolist(),))


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # (time, tokens) of each step that fed the prompt before the first token: one entry per
    # chunk under chunked prefill (tracing shows them as events)
    prefill_chunks: list[tuple[float, int]] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One generated sequence. `logprobs`, when asked for, has one dict per generated token
    mapping token id -> logprob; it always holds the chosen token and the top-n. `token_ids`
    and `logprobs` are read-only (views shared with the engine, see `PrefixView`)."""

    index: int
    text: str
    token_ids: Sequence[int]  # a list, or a `PrefixView` (read-only) of the request's own list
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: Sequence[dict[int, float]] | None = None  # a list or a `PrefixView`, like token_ids
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """``error`` is set (and ``finished`` is True) when the engine failed while running the
    request; `AsyncEngine` raises it to that request's caller as `RequestFailedError`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None
    num_preemptions: int = 0  # times the request's sequences were preempted (recomputed) so far
    embedding: list[float] | None = None  # an embedding request's pooled vector (engine/pooling.py)
    lora_name: str | None = None  # the LoRA adapter it ran with (engine/lora/); None = base model


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics. Counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_blocks: int = 0
    block_size: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    last_step_time: float = 0.0
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    last_schedule_time: float = 0.0  # seconds of the last step in schedule() + update_from_output()
    last_execute_time: float = 0.0  # seconds of the last step in the model runner (forward + sample)
    last_output_time: float = 0.0  # seconds of the last step building outputs (detokenize, stops)
    # LoRA (GIE's vllm:lora_requests_info): adapters of running / waiting requests, sorted names
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0  # 0 when LoRA is disabled
    # how the model runs (conveyor_model_config_info): "" until the engine has loaded
    dtype: str = ""
    linear_backend: str = ""
    attention_backend: str = ""
    extra: dict = field(default_factory=dict)
