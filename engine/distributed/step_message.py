"""The one message rank 0 broadcasts per step: a slim, worker-side view of `SchedulerOutput`.

It carries only what a worker's forward pass reads (sequence ids for the block-table rows,
token ids, how many tokens are already cached, block tables, which sequences sample: their
rows go through the vocab-parallel LM head on every rank).
It deliberately leaves out what must not or need not cross a process boundary: per-request
`torch.Generator`s, grammar states, sampling parameters and the prompt/output token lists used
for penalties. Sampling runs once, on rank 0, which holds all of those.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.scheduler.output import SchedulerOutput


@dataclass(slots=True)
class WorkerSeq:
    """One sequence of the step, with the attribute names `ModelRunner.execute` reads. A worker
    computes its vocabulary slice of the logits of the ``sample`` rows but never samples, and
    never pools (rank 0 does both): the sampling fields are absent (None)."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool

    pooling = None
    lora_id = None
    sampling_params = prompt_token_ids = output_token_ids = generator = grammar = None


@dataclass
class StepMessage:
    """A step to run (``scheduled``), or ``shutdown``: the worker leaves its loop and exits."""

    scheduled: list[WorkerSeq] = field(default_factory=list)
    shutdown: bool = False

    @classmethod
    def of(cls, out: SchedulerOutput) -> "StepMessage":
        return cls([WorkerSeq(s.request_id, list(s.token_ids), s.num_computed_tokens, list(s.block_ids), s.sample)
                    for s in out.scheduled])
