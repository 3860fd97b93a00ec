"""LoRA metrics, exported only by a server with LoRA enabled on some model.

`vllm:lora_requests_info` is the gauge of the Gateway API Inference Extension's model-server
protocol (its endpoint picker's LoRA affinity reads it): labels `max_lora` (adapters one batch
can hold), `running_lora_adapters` and `waiting_lora_adapters` (comma-separated adapter names of
running and waiting requests, as the engine reports them), value the unix time the label set was
last updated. One sample per LoRA-enabled model, with exactly those three labels, as vLLM
exports it (a picker matches the names); two models with identical label sets give one sample.
Per-adapter counters (`conveyor_lora_requests`, `conveyor_lora_tokens`) carry `model_name`
(the base model) and `lora_name`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from engine.outputs import EngineStats, RequestOutput

INFO = "vllm:lora_requests_info"


@dataclass
class _Watched:
    """One LoRA-enabled model: where its stats come from and when its label set last changed."""

    get_stats: Callable[[], EngineStats]
    max_loras: int  # the engine config's, for stats that do not report it
    labels: tuple[str, str, str] | None = None
    updated: float = 0.0


@dataclass(eq=False)  # hashable: the registry keys collectors by identity
class LoRAMetrics:
    registry: CollectorRegistry
    _watched: list[_Watched] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # scrapes and engine steps update labels

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("conveyor_lora_requests", "Finished requests per LoRA adapter, by finish "
                                "reason (abort: the client left, a timeout or shutdown).",
                                ["model_name", "lora_name", "finished_reason"], registry=r)
        self.tokens = Counter("conveyor_lora_tokens", "Prompt and generated tokens per LoRA adapter.",
                              ["model_name", "lora_name", "kind"], registry=r)  # kind: prompt | generation
        r.register(self)

    def watch(self, get_stats: Callable[[], EngineStats], max_loras: int) -> Callable[[EngineStats], None]:
        """Adds a model to `vllm:lora_requests_info`; returns the per-step observer that keeps
        its update time current (call it with each step's stats, from any thread)."""
        watched = _Watched(get_stats, max_loras)
        self._watched.append(watched)
        return lambda stats: self._update(watched, stats)

    def observe_finished(self, model: str, lora_name: str, out: RequestOutput | None, reason: str) -> None:
        self.requests.labels(model, lora_name, reason).inc()
        if out is not None:
            self.tokens.labels(model, lora_name, "prompt").inc(len(out.prompt_token_ids))
            self.tokens.labels(model, lora_name, "generation").inc(sum(len(c.token_ids) for c in out.outputs))

    def _update(self, watched: _Watched, stats: EngineStats) -> tuple[str, str, str]:
        max_loras = getattr(stats, "max_loras", 0) or watched.max_loras
        labels = (str(max_loras), ",".join(getattr(stats, "running_lora_adapters", None) or []),
                  ",".join(getattr(stats, "waiting_lora_adapters", None) or []))
        with self._lock:
            if labels != watched.labels:
                watched.labels, watched.updated = labels, time.time()
        return labels

    def collect(self):
        info = GaugeMetricFamily(INFO, "Running and waiting LoRA adapters (value: unix time of the last "
                                 "change), as the Gateway API Inference Extension reads it.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        newest: dict[tuple[str, str, str], float] = {}
        for watched in self._watched:
            labels = self._update(watched, watched.get_stats())
            newest[labels] = max(newest.get(labels, 0.0), watched.updated)
        for labels, updated in newest.items():
            info.add_metric(list(labels), updated)
        yield info
