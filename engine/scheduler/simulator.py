"""A discrete-event simulator of the engine: the real `Scheduler`, `KVCacheManager`, `Request`
and policies, with the model replaced by a `CostModel` and wall time by simulated time.

Each loop iteration is one engine step, through the same two calls as `LLMEngine.step`:
requests whose arrival time has come are added, ``Scheduler.schedule`` builds the batch (reading
simulated time through its ``clock``), the clock advances by the cost model's step time, and
``Scheduler.update_from_output`` gets one token for every sequence the runner would sample. A
request generates exactly its trace's ``output_len`` tokens (EOS is ignored). When nothing is
running the clock jumps to the next arrival.

This module composes the scheduler with a real `KVCacheManager` (as `LLMEngine` does), so it
imports ``engine.kv_cache``; the scheduler itself does not.

Guarantees: every request of the trace finishes (or ``simulate`` raises); the KV cache ends
empty; the same trace, config, policy and cost model give the same result.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.cost_model import CostModel
from engine.scheduler.output import SampledTokens
from engine.scheduler.policies import SchedulingPolicy, make_policy
from engine.scheduler.scheduler import Scheduler, SchedulerConfig
from engine.scheduler.traces import TraceRequest


@dataclass
class SimConfig:
    """The engine settings that matter to scheduling (same meaning as in `EngineConfig`)."""

    num_blocks: int = 4096
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    static_batching: bool = False
    vocab_size: int = 49152  # prompt token ids are drawn from [0, vocab_size)
    seed: int = 0


@dataclass
class RequestRecord:
    """Simulated timestamps (seconds from the trace start) of one finished request."""

    request_id: str
    tenant: str | None
    priority: int
    prompt_len: int
    output_len: int
    arrival_time: float
    first_scheduled_time: float = float("nan")
    first_token_time: float = float("nan")
    finished_time: float = float("nan")
    num_preemptions: int = 0
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (nan for one-token requests)."""
        if self.output_len < 2:
            return float("nan")
        return (self.finished_time - self.first_token_time) / (self.output_len - 1)


@dataclass
class Timeline:
    """One entry per step, taken at the end of the step."""

    time: list[float] = field(default_factory=list)
    kv_usage: list[float] = field(default_factory=list)
    num_running: list[int] = field(default_factory=list)
    num_waiting: list[int] = field(default_factory=list)
    num_batched_tokens: list[int] = field(default_factory=list)


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    timeline: Timeline
    num_steps: int
    num_preemptions: int
    wall_seconds: float  # how long the simulation itself took

    @property
    def makespan(self) -> float:
        """Seconds from the first arrival to the last finish."""
        return max(r.finished_time for r in self.records) - min(r.arrival_time for r in self.records)

    def goodput(self, ttft_slo: float | None, tpot_slo: float | None) -> float:
        """The fraction of requests that met both latency targets (a one-token request has no
        TPOT and meets any TPOT target; ``None`` means no target)."""
        ok = [(ttft_slo is None or r.ttft <= ttft_slo) and (tpot_slo is None or not r.tpot > tpot_slo)
              for r in self.records]
        return float(np.mean(ok)) if ok else float("nan")

    def summary(self, ttft_targets: dict[int, float] | None = None, ttft_slo: float | None = None,
                tpot_slo: float | None = None) -> dict:
        """Throughput, goodput under ``ttft_slo`` / ``tpot_slo`` (seconds), latency percentiles,
        preemptions, KV usage, Jain's fairness index over tokens served per tenant, per-tenant
        and per-priority TTFT and TPOT percentiles (per priority also the fraction of requests
        whose TTFT met their class's ``ttft_targets`` entry)."""
        recs = self.records
        out_tokens = sum(r.output_len for r in recs)
        span = max(self.makespan, 1e-12)
        summary = {
            "policy": self.policy,
            "num_requests": len(recs),
            "makespan_s": self.makespan,
            "throughput_req_s": len(recs) / span,
            "throughput_out_tok_s": out_tokens / span,
            "throughput_total_tok_s": (out_tokens + sum(r.prompt_len for r in recs)) / span,
            "ttft_s": percentiles([r.ttft for r in recs]),
            "tpot_s": percentiles([r.tpot for r in recs]),
            "e2e_s": percentiles([r.e2e for r in recs]),
            "goodput": self.goodput(ttft_slo, tpot_slo),
            "ttft_slo_s": ttft_slo,
            "tpot_slo_s": tpot_slo,
            "num_preemptions": self.num_preemptions,
            "num_steps": self.num_steps,
            "kv_usage_mean": float(np.mean(self.timeline.kv_usage)) if self.timeline.kv_usage else 0.0,
            "kv_usage_max": max(self.timeline.kv_usage, default=0.0),
            "sim_wall_s": self.wall_seconds,
        }
        tenants = sorted({r.tenant for r in recs if r.tenant is not None})
        summary["per_tenant"] = {
            t: {
                "num_requests": len(rs := [r for r in recs if r.tenant == t]),
                "out_tokens": sum(r.output_len for r in rs),
                "served_tokens": sum(r.prompt_len + r.output_len for r in rs),
                "share_of_out_tokens": sum(r.output_len for r in rs) / max(out_tokens, 1),
                "ttft_s": percentiles([r.ttft for r in rs]),
                "tpot_s": percentiles([r.tpot for r in rs]),
            }
            for t in tenants
        }
        summary["jain_fairness"] = jain_index([v["served_tokens"] for v in summary["per_tenant"].values()])
        classes = sorted({r.priority for r in recs})
        summary["per_priority"] = {}
        if len(classes) > 1 or ttft_targets:
            for p in classes:
                ttfts = [r.ttft for r in recs if r.priority == p]
                entry = {"num_requests": len(ttfts), "ttft_s": percentiles(ttfts),
                         "tpot_s": percentiles([r.tpot for r in recs if r.priority == p])}
                if ttft_targets and p in ttft_targets:
                    entry["ttft_target_s"] = ttft_targets[p]
                    entry["ttft_target_met"] = float(np.mean([t <= ttft_targets[p] for t in ttfts]))
                summary["per_priority"][p] = entry
        return summary


def jain_index(values: list[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one takes
    all; nan for no values. Over tokens served per tenant it measures equal service, so a
    trace whose tenants offer unequal load scores below 1 even under a perfectly fair policy."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not (x ** 2).sum() > 0:
        return float("nan")
    return float(x.sum() ** 2 / (x.size * (x ** 2).sum()))


def percentiles(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 of the finite values (nan when there are none)."""
    arr = np.array([v for v in values if np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


class Simulator:
    """Runs one trace under one policy. Use a fresh `Simulator` per run (policies keep state)."""

    def __init__(self, config: SimConfig, cost_model: CostModel,
                 policy: str | type[SchedulingPolicy] | SchedulingPolicy = "fcfs"):
        self.config = config
        self.cost_model = cost_model
        self.policy = make_policy(policy)
        self.policy_name = policy if isinstance(policy, str) and ":" not in policy else self.policy.name
        self.now = 0.0
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        sched_config = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs,
                                       config.max_model_len, config.static_batching)
        self.scheduler = Scheduler(sched_config, self.kv, self.policy, clock=lambda: self.now)
        self._rng = np.random.default_rng(config.seed)
        self._prefixes: dict[str, list[int]] = {}
        self._params = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0)

    def _check(self, req: TraceRequest) -> None:
        total = req.prompt_len + req.output_len
        capacity = self.config.num_blocks * self.config.block_size
        if total > self.config.max_model_len:
            raise ValueError(f"prompt_len + output_len of {req.request_id} ({total}) exceeds max_model_len "
                             f"({self.config.max_model_len})")
        if total > capacity:
            raise ValueError(f"prompt_len + output_len of {req.request_id} ({total}) exceeds the KV cache "
                             f"capacity ({capacity} tokens = num_blocks * block_size)")

    def _prompt(self, req: TraceRequest) -> list[int]:
        vocab = self.config.vocab_size
        prefix: list[int] = []
        if req.prefix_group is not None and req.prefix_len:
            shared = self._prefixes.get(req.prefix_group, [])
            if len(shared) < req.prefix_len:  # same group, same tokens: derived from its name
                group_rng = np.random.default_rng([self.config.seed, zlib.crc32(req.prefix_group.encode())])
                shared = group_rng.integers(0, vocab, size=req.prefix_len).tolist()
                self._prefixes[req.prefix_group] = shared
            prefix = shared[: req.prefix_len]
        return prefix + self._rng.integers(0, vocab, size=req.prompt_len - len(prefix)).tolist()

    def run(self, trace: list[TraceRequest]) -> SimResult:
        for req in trace:
            self._check(req)
        trace = sorted(trace, key=lambda r: r.arrival_time)
        started = time.perf_counter()
        sched, cost, timeline = self.scheduler, self.cost_model, Timeline()
        live: dict[str, tuple[Request, RequestRecord]] = {}
        done: list[RequestRecord] = []
        num_steps, next_i, idle_steps = 0, 0, 0
        self.now = trace[0].arrival_time
        while next_i < len(trace) or sched.has_unfinished():
            while next_i < len(trace) and trace[next_i].arrival_time <= self.now:
                t = trace[next_i]
                request = Request(t.request_id, self._prompt(t), self._params, t.output_len,
                                  t.arrival_time, t.priority, None, t.tenant)
                live[t.request_id] = (request, RequestRecord(
                    t.request_id, t.tenant, t.priority, t.prompt_len, t.output_len, t.arrival_time))
                sched.add_request(request)
                next_i += 1
            if not sched.has_unfinished():
                self.now = trace[next_i].arrival_time  # idle: jump to the next arrival
                continue
            out = sched.schedule()
            if out.is_empty:
                # Only a step that preempted everything may be empty; it frees blocks for the next.
                idle_steps += 1
                if idle_steps > 2:
                    if next_i == len(trace):
                        raise RuntimeError(f"the scheduler made no progress at t={self.now:.3f}s with "
                                           f"{sched.num_waiting} waiting requests")
                    self.now = trace[next_i].arrival_time
                continue
            idle_steps = 0
            step_start = self.now
            sum_context = 0
            for s in out.scheduled:
                sum_context += s.num_computed_tokens + s.num_new_tokens
                record = live[s.request_id][1]
                if record.first_scheduled_time != record.first_scheduled_time:  # nan: first time
                    record.first_scheduled_time = step_start
            self.now += cost.step_time(out.num_batched_tokens, sum_context, len(out.scheduled))
            num_steps += 1
            # The "model": the next token of a sequence of length L is L mod vocab_size.
            sampling = [s for s in out.scheduled if s.sample]
            sampled = SampledTokens([s.request_id for s in sampling],
                                    [(s.num_computed_tokens + s.num_new_tokens) % self.config.vocab_size
                                     for s in sampling])
            finished = sched.update_from_output(out, sampled)
            for rid in sampled.request_ids:
                request, record = live[rid]
                if request.num_output_tokens == 1:
                    record.first_token_time = self.now
            for request in finished:
                record = live.pop(request.request_id)[1]
                record.finished_time = self.now
                record.num_preemptions = request.num_preemptions
                record.num_cached_tokens = max(request.num_cached_tokens, 0)
                done.append(record)
            timeline.time.append(self.now)
            timeline.kv_usage.append(self.kv.usage)
            timeline.num_running.append(len(sched.running))
            timeline.num_waiting.append(sched.num_waiting)
            timeline.num_batched_tokens.append(out.num_batched_tokens)
        return SimResult(self.policy_name, done, timeline, num_steps, sched.num_preemptions,
                         time.perf_counter() - started)


def simulate(trace: list[TraceRequest], policy: str | type[SchedulingPolicy] | SchedulingPolicy = "fcfs",
             config: SimConfig | None = None, cost_model: CostModel | None = None) -> SimResult:
    """Simulates the trace under one policy (a name, ``"module:Class"``, a class or an instance)."""
    if not trace:
        raise ValueError("trace must hold at least one request")
    return Simulator(config or SimConfig(), cost_model or CostModel(), policy).run(trace)
