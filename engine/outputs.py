"""What the engine hands back to callers. Outputs are cumulative: each `RequestOutput` of a
request carries all text and tokens generated so far, so a consumer that only needs the newest
one can drop the rest."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One generated sequence. `logprobs`, when asked for, has one dict per generated token
    mapping token id -> logprob; it always holds the chosen token and the top-n."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[dict[int, float]] | None = None
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
    extra: dict = field(default_factory=dict)
