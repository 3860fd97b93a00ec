"""Continuous-batching scheduler: owns every unfinished request and each step's bookkeeping.

A step is ``schedule()`` -> runner -> ``update_from_output()``:

* ``schedule`` picks the work. There are no prefill and decode phases: each scheduled request
  gets tokens so that its ``num_computed_tokens`` catches up with its ``num_tokens``, under a
  budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences. Running requests
  are served first (in admission order, so decode latency stays steady), then waiting requests
  are admitted in the policy's order, each taking as much of the remaining budget as it needs
  (chunked prefill); with ``max_loras`` the running requests never use more distinct LoRA
  adapters than that (adapter_limit.py). When KV blocks run out for a running request, the policy picks a victim
  among the running requests not yet scheduled this step; the victim's blocks are freed and it
  goes back to the waiting queue with ``num_computed_tokens = 0`` (it will recompute, with
  prefix-cache help).
* ``update_from_output`` applies the runner's result: marks the fed tokens computed, appends
  each sampled token (and its logprobs), stops requests on EOS, stop token ids, ``max_tokens``
  or ``max_model_len``, and frees the blocks of those that finished.

Stop strings need text, so the output processor applies them and calls ``finish_request``.
No request is lost: every request is always in exactly one of ``waiting``, ``running``, or
finished (removed, its blocks freed). The KV cache manager is handed in (any object with
`KVCacheManager`'s methods); this module does not import the ``kv_cache`` package.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.request import Request, RequestStatus
from engine.scheduler.adapter_limit import AdapterLimit, running_adapters
from engine.scheduler.output import SampledTokens, ScheduledRequest, SchedulerOutput
from engine.scheduler.policies import SchedulingPolicy
from engine.scheduler.waiting_queue import WaitingQueue

if TYPE_CHECKING:
    from engine.kv_cache.kv_cache_manager import KVCacheManager


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    static_batching: bool = False  # admit a new batch only when the running one has finished
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    # LoRA: at most this many distinct adapters among the running requests (0: no limit, LoRA off)
    max_loras: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: "KVCacheManager", policy: SchedulingPolicy,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock  # the simulator passes simulated time
        self.kv = kv
        self.policy = policy
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.running: list[Request] = []
        self._waiting = WaitingQueue(policy)  # in the policy's admission order
        self._seq = 0
        self.num_preemptions = 0
        self._batch: set[str] = set()  # static batching: members of the batch being run

    # -- queue --------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_requests(self) -> list[Request]:
        return list(self._waiting)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._seq += 1
        request.seq_no = self._seq
        self.requests[request.request_id] = request
        self.policy.on_added(request)
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self._waiting.push(request, self.clock())

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Removes a request from whichever queue holds it and frees its blocks (a no-op for a
        request that already finished)."""
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._waiting.remove(request)
        request.status = status
        del self.requests[request.request_id]
        self._batch.discard(request.request_id)
        self.kv.free(request.request_id)
        self.policy.on_finished(request)

    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        scheduled_ids: set[str] = set()

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.kv.allocate_slots(request.request_id, request.all_token_ids,
                                             request.num_computed_tokens, num_new, salt=request.prefix_salt):
                candidates = [r for r in self.running if r.request_id not in scheduled_ids]
                victim = max(candidates, key=lambda r: self.policy.preemption_key(r, now))
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            chosen.append((request, num_new))
            scheduled_ids.add(request.request_id)
            budget -= num_new

        admit = not out.preempted_ids
        allowed = min(budget, self.policy.admission_budget(budget, now))  # a policy may hold prefill back
        if admit and self._waiting and allowed > 0 and len(self.running) < self.config.max_num_seqs:
            budget += self._admit(now, allowed, chosen) - allowed

        for request, n in chosen:
            self.policy.on_scheduled(request, n)
        out.scheduled = [self._scheduled(request, n) for request, n in chosen]
        return out

    def _admit(self, now: float, budget: int, chosen: list[tuple[Request, int]]) -> int:
        """Admits waiting requests in policy order while budget, seats and blocks last.

        With ``max_loras``, a request whose adapter would be one too many among the running
        requests waits, and later requests may pass it at most ``max_num_seqs`` times
        (`AdapterLimit`), so no adapter starves."""
        self._waiting.rerank(now)  # keys that move with time or accounts (see waiting_queue.py)
        c = self.config
        limit = AdapterLimit(self.running, c.max_loras, c.max_num_seqs) if c.max_loras else None
        if self.config.static_batching and not self._batch:
            # the next batch: the first max_num_seqs waiting requests, fixed until all finish
            self._batch = {r.request_id for r in self._waiting.smallest(self.config.max_num_seqs, now)}
        deferred = []  # requests whose grammar is still compiling: they wait, others pass
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._waiting.peek(now)
            if not request.is_ready() and not self.config.static_batching:
                self._waiting.pop(request)
                deferred.append(request)
                continue
            if self.config.static_batching and request.request_id not in self._batch:
                # a newcomer outranks the batch (or keys moved): admit the batch's best member
                best = self._waiting.smallest(1, now, lambda r: r.request_id in self._batch)
                if not best:
                    break
                request = best[0]
            if limit is not None and not limit.fits(request):
                if limit.starved(request):
                    break  # passed often enough: admit nothing until its adapter fits
                self._waiting.pop(request)
                limit.blocked.append(request)
                continue
            rid, tokens, salt = request.request_id, request.all_token_ids, request.prefix_salt
            # a mean-pooled embedding needs every position's hidden state: no prefix-cache reuse
            reuse = request.pooling is None or not request.pooling.params.needs_all_positions
            cached = self.kv.find_cached_prefix(rid, tokens, salt) if reuse else []
            num_computed = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if not self.kv.allocate_slots(rid, tokens, 0, num_new, cached, salt):
                break  # keep admission order: don't let later requests jump the queue
            self._waiting.pop(request)
            self.kv.record_lookup(request.num_tokens, num_computed)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chosen.append((request, num_new))
            budget -= num_new
            if limit is not None and limit.admitted(request):
                break  # a blocked request was passed often enough
        for request in deferred + (limit.blocked if limit is not None else []):
            self._waiting.push(request, now)
        return budget

    def _scheduled(self, request: Request, n: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        pooling = request.pooling.params.pooling if request.pooling is not None else None
        return ScheduledRequest(
            request.request_id, request.all_token_ids[start:start + n], start,
            self.kv.block_ids(request.request_id), start + n == request.num_tokens and pooling is None,
            request.sampling_params, request.prompt_token_ids, request.output_token_ids, request.generator,
            pooling, request.grammar, request.lora_id,
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id, keep_hashes=True)
        request.num_computed_tokens = 0
        if request.pooling is not None:  # it recomputes from its first token
            request.pooling.reset()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)

    def update_from_output(self, output: SchedulerOutput, sampled: SampledTokens) -> list[Request]:
        """Applies a step's result: the fed tokens become computed, each sampled token is
        appended (with its logprobs when the request asked), and requests that hit EOS, a stop
        token id, ``max_tokens`` or ``max_model_len`` finish (blocks freed). A pooling request
        takes its chunk's pooled part and finishes (stopped) once its whole prompt is computed.
        Returns the requests that finished."""
        finished = []
        for s in output.scheduled:
            request = self.requests.get(s.request_id)
            if request is not None:  # else: finished (aborted) since it was scheduled
                request.num_computed_tokens += len(s.token_ids)
                if request.pooling is not None:
                    request.pooling.add(sampled.pooled[s.request_id], len(s.token_ids))
                    if request.num_computed_tokens == request.num_tokens:
                        self.finish_request(request, RequestStatus.FINISHED_STOPPED)
                        finished.append(request)
        for i, rid in enumerate(sampled.request_ids):
            request = self.requests.get(rid)
            if request is None:
                continue
            token = sampled.token_ids[i]
            request.append_output_token(token)
            if request.sampling_params.logprobs is not None and sampled.logprobs is not None:
                request.logprobs.append(sampled.logprobs[i])
                request.cumulative_logprob += sampled.chosen_logprobs[i]
            status = self._stop_status(request, token)
            if status is not None:
                self.finish_request(request, status)
                finished.append(request)
        return finished

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.config.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def fail_step(self, output: SchedulerOutput) -> list[Request]:
        """Finishes every still-unfinished request of a step that failed with
        ``FINISHED_ERROR``. Blocks whose K/V that step was to write leave the prefix cache
        before they are freed, so no later request can hit unwritten contents."""
        failed = []
        for s in output.scheduled:
            request = self.requests.get(s.request_id)
            if request is None:
                continue
            self.kv.free(request.request_id, keep_hashes=True, num_valid_tokens=s.num_computed_tokens)
            self.finish_request(request, RequestStatus.FINISHED_ERROR)
            failed.append(request)
        return failed

    # -- checks -------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raises AssertionError unless the queues, the request table and the KV cache agree:
        every unfinished request is in exactly one queue with its matching status, only running
        requests hold blocks, and those cover their computed tokens."""
        self.kv.check_integrity()
        waiting = list(self._waiting)
        ids = [r.request_id for r in self.running] + [r.request_id for r in waiting]
        assert len(ids) == len(set(ids)), "a request is queued twice"
        assert set(ids) == set(self.requests), "the request table and the queues disagree"
        assert all(r.status == RequestStatus.RUNNING for r in self.running), "a running request has another status"
        assert all(r.status == RequestStatus.WAITING for r in waiting), "a waiting request has another status"
        assert len(self.running) <= self.config.max_num_seqs
        assert not self.config.max_loras or len(running_adapters(self.running)) <= self.config.max_loras, (
            "more LoRA adapters running than max_loras")
        for r in self.running:
            assert len(self.kv.block_ids(r.request_id)) * self.kv.block_size >= r.num_computed_tokens, (
                f"request {r.request_id}: blocks do not cover its {r.num_computed_tokens} computed tokens")
        for r in waiting:
            assert not self.kv.block_ids(r.request_id), f"waiting request {r.request_id} holds blocks"
        stray = self.kv.tracked_requests() - set(self.requests)
        assert not stray, f"the KV cache holds state of finished requests {sorted(stray)[:3]}"

    def check_idle(self) -> None:
        """The O(1) subset of ``check_integrity`` that must hold when nothing is unfinished."""
        assert not self.requests and not self.running and not self._waiting, "requests left in the scheduler"
        assert self.kv.is_idle(), (f"KV cache not empty at idle: {self.kv.num_free_blocks} of "
                                   f"{self.kv.num_blocks} blocks free")
