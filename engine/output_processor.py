"""Turns sampled tokens into text and `RequestOutput`s, and decides when a sequence stops.

One user request with ``n`` > 1 becomes ``n`` scheduler requests (its sequences); this class
groups them back. Text handed out while a sequence runs never contains a partial stop string
(the detokenizer holds such a tail back), and once finished it is exactly the final text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.scheduler.request import Request, RequestStatus


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

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._groups: dict[str, _Group] = {}
        self._seq_of: dict[str, tuple[_Group, _Sequence]] = {}  # scheduler request id -> seq

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

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

    def mark_scheduled(self, request: Request, now: float) -> None:
        metrics = self.group_of(request).metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = now

    def on_token(self, request: Request, token_id: int, now: float) -> RequestStatus | None:
        """Records a token just appended to ``request``; returns the finish status if the
        sequence must stop now, else None."""
        group, seq = self._seq_of[request.request_id]
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        params = request.sampling_params
        stop_str = seq.detok.add_token(token_id) if seq.detok is not None else None
        past_min = request.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and token_id in (params.stop_token_ids or ()):
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if stop_str is not None:
            request.stop_reason = stop_str
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

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
                    token_ids=list(req.output_token_ids),
                    finish_reason=req.status.value if done else None,
                    stop_reason=req.stop_reason,
                    logprobs=list(req.logprobs) if req.sampling_params.logprobs is not None else None,
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
        )
