"""Turns sampled tokens into text and `RequestOutput`s, and applies stop strings.

The scheduler has already appended each step's tokens and stopped requests on EOS, stop token
ids and length limits; this class only detokenizes, ends a sequence whose text reached a stop
string (through the scheduler's ``finish_request``), and builds the outputs.

One user request with ``n`` > 1 becomes ``n`` scheduler requests (its sequences); this class
groups them back. Text handed out while a sequence runs never contains a partial stop string
(the detokenizer holds such a tail back), and once finished it is exactly the final text.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, PrefixView, RequestMetrics, RequestOutput
from engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from engine.scheduler.output import ScheduledRequest

FinishFn = Callable[[Request, RequestStatus], None]


@dataclass
class _Sequence:
    request: Request
    index: int
    detok: IncrementalDetokenizer | None
    text: str = ""  # text handed out so far


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    seqs: list[_Sequence] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._seq_of: dict[str, tuple[_Group, _Sequence]] = {}  # scheduler request id -> seq

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, request_id: str, prompt: str | None, children: list[Request], arrival_time: float) -> None:
        group = _Group(request_id, prompt, children[0].prompt_token_ids, RequestMetrics(arrival_time))
        for i, child in enumerate(children):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids, child.sampling_params)
            seq = _Sequence(child, i, detok)
            group.seqs.append(seq)
            self._seq_of[child.request_id] = (group, seq)
        self._groups[request_id] = group

    def children(self, request_id: str) -> list[Request]:
        group = self._groups.get(request_id)
        return [s.request for s in group.seqs] if group else []

    def group_of(self, request: Request) -> _Group:
        return self._seq_of[request.request_id][0]

    def groups_of(self, request_ids: Iterable[str]) -> list[_Group]:
        """The live groups of these sequence ids, each once, in first-seen order."""
        groups: dict[str, _Group] = {}
        for rid in request_ids:
            entry = self._seq_of.get(rid)
            if entry is not None:
                groups.setdefault(entry[0].request_id, entry[0])
        return list(groups.values())

    def mark_scheduled(self, scheduled: Iterable[ScheduledRequest], now: float) -> None:
        """Records when each group was first scheduled and, until its first token, each prompt
        chunk it fed (once per group and step, from its first sequence)."""
        seen: set[str] = set()
        for s in scheduled:
            group = self._seq_of[s.request_id][0]
            metrics = group.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
            if metrics.first_token_time is None and group.request_id not in seen:
                seen.add(group.request_id)
                metrics.prefill_chunks.append((now, s.num_new_tokens))

    def process(self, requests: list[Request], now: float, finish: FinishFn, into: list[RequestOutput]) -> None:
        """Handles the token each of ``requests`` just got: detokenizes it, applies stop
        strings (``finish`` ends the sequence), and appends one output per group to ``into``
        (as it goes, so outputs already made survive an exception in a later group)."""
        members: dict[str, tuple[_Group, list[tuple[Request, _Sequence]]]] = {}
        for request in requests:
            group, seq = self._seq_of[request.request_id]
            members.setdefault(group.request_id, (group, []))[1].append((request, seq))
        for group, seqs in members.values():  # one group at a time, its output right after it
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
            for request, seq in seqs:
                if seq.detok is not None:
                    self._detokenize(request, seq, finish)
            into.append(self.make_output(group, now))

    @staticmethod
    def _detokenize(request: Request, seq: _Sequence, finish: FinishFn) -> None:
        stop_str = seq.detok.add_token(request.output_token_ids[-1])
        # EOS and stop token ids take precedence; a stop string beats a length limit
        if stop_str is not None and request.status != RequestStatus.FINISHED_STOPPED:
            request.stop_reason = stop_str
            if request.status.finished:  # hit max_tokens on this same token
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                finish(request, RequestStatus.FINISHED_STOPPED)

    def fail(self, group: _Group, error: str, now: float) -> RequestOutput:
        """The final output of a group whose sequences all ended in an engine error."""
        group.error = error
        return self.make_output(group, now)

    def make_output(self, group: _Group, now: float) -> RequestOutput:
        """The cumulative output of a request; releases its state once every sequence ended."""
        outputs = []
        for seq in group.seqs:
            req = seq.request
            done = req.status.finished
            if seq.detok is not None:
                seq.text += seq.detok.stream_delta(done)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text,
                    token_ids=PrefixView(req.output_token_ids),  # O(1): no copy per step
                    finish_reason=req.status.value if done else None,
                    stop_reason=req.stop_reason,
                    logprobs=PrefixView(req.logprobs) if req.sampling_params.logprobs is not None else None,
                    cumulative_logprob=req.cumulative_logprob if req.sampling_params.logprobs is not None else None,
                )
            )
        finished = group.finished
        if finished:
            group.metrics.finished_time = now
            del self._groups[group.request_id]
            for seq in group.seqs:
                self._seq_of.pop(seq.request.request_id, None)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=group.metrics,
            num_cached_tokens=max(0, group.seqs[0].request.num_cached_tokens),
            num_preemptions=sum(seq.request.num_preemptions for seq in group.seqs),
            lora_name=group.seqs[0].request.lora_name,
            error=group.error,
        )

    def check_integrity(self, unfinished: set[str]) -> None:
        """Raises AssertionError unless the tracked groups match ``unfinished`` (the ids of the
        sequences the scheduler still holds): each of those belongs to a group, each tracked
        group still has one of them, and no finished group is left unreleased."""
        assert unfinished <= set(self._seq_of), "the scheduler holds a sequence with no output group"
        for group in self._groups.values():
            running = [s.request.request_id for s in group.seqs if not s.request.status.finished]
            assert running, f"finished request {group.request_id} was never released"
            assert set(running) <= unfinished, f"request {group.request_id} runs outside the scheduler"
