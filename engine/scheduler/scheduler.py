"""Continuous-batching scheduler.

There are no prefill and decode phases. Every step, each scheduled request gets tokens so that
its ``num_computed_tokens`` catches up with its ``num_tokens``, under a budget of
``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences. Running requests are served
first (in admission order, so decode latency stays steady), then waiting requests are admitted in
the policy's order, each taking as much of the remaining budget as it needs (chunked prefill).

When KV blocks run out for a running request, the policy picks a victim among the running
requests not yet scheduled this step; the victim's blocks are freed and it goes back to the
waiting queue with ``num_computed_tokens = 0`` (it will recompute, with prefix-cache help).
No request is lost: every request is always in exactly one of ``waiting``, ``running``, or
finished (removed).
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.scheduler.policy import SchedulingPolicy
from engine.scheduler.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048
    static_batching: bool = False  # admit a new batch only when the running one has finished


@dataclass
class SchedulerOutput:
    """One step's work: requests and how many new tokens each feeds, in admission order."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: SchedulingPolicy,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock  # the simulator passes simulated time
        self.kv = kv
        self.policy = policy
        self.running: list[Request] = []
        self._waiting: list[tuple[tuple, int, Request]] = []  # heap (static keys) or list
        self._seq = 0
        self.num_preemptions = 0
        self._batch: set[str] = set()  # static batching: members of the batch being run

    # -- queue --------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_requests(self) -> list[Request]:
        return [r for _, _, r in self._waiting]

    def add_request(self, request: Request) -> None:
        self._seq += 1
        request.seq_no = self._seq
        self.policy.on_added(request)
        self._push_waiting(request)

    def _push_waiting(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        key = self.policy.admission_key(request, self.clock())
        heapq.heappush(self._waiting, (key, request.seq_no, request))

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Removes a request from whichever queue holds it and frees its blocks."""
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._waiting = [e for e in self._waiting if e[2] is not request]
            heapq.heapify(self._waiting)
        request.status = status
        self._batch.discard(request.request_id)
        self.kv.free(request)
        self.policy.on_finished(request)

    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self.kv.allocate_slots(request, num_new):
                candidates = [r for r in self.running if r.request_id not in scheduled_ids]
                victim = max(candidates, key=lambda r: self.policy.preemption_key(r, now))
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            out.scheduled.append((request, num_new))
            scheduled_ids.add(request.request_id)
            budget -= num_new

        admit = not out.preempted
        if admit and self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if not self.policy.static_keys:  # keys move with time or accounts: re-rank
                self._waiting = [(self.policy.admission_key(r, now), r.seq_no, r) for _, _, r in self._waiting]
                heapq.heapify(self._waiting)
            if self.config.static_batching and not self._batch:
                # the next batch: the first max_num_seqs waiting requests, fixed until all finish
                self._batch = {r.request_id for _, _, r in heapq.nsmallest(self.config.max_num_seqs, self._waiting)}
            while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self._waiting[0][2]
                if self.config.static_batching and request.request_id not in self._batch:
                    break
                cached = self.kv.find_cached_prefix(request)
                num_computed = len(cached) * self.kv.block_size
                num_new = min(request.num_tokens - num_computed, budget)
                if not self.kv.allocate_slots(request, num_new, cached):
                    break  # keep admission order: don't let later requests jump the queue
                heapq.heappop(self._waiting)
                self.kv.record_lookup(request.num_tokens, num_computed)
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_computed
                request.num_computed_tokens = num_computed
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                out.scheduled.append((request, num_new))
                budget -= num_new

        for request, n in out.scheduled:
            self.policy.on_scheduled(request, n)
        return out

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)

    def advance(self, out: SchedulerOutput) -> None:
        """Marks the scheduled tokens as computed (call after the forward pass)."""
        for request, n in out.scheduled:
            request.num_computed_tokens += n
