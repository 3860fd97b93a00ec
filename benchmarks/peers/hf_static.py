"""`transformers` `generate` with padded static batches: the requests are cut, in order, into
batches of a fixed size; each batch is left-padded and runs until its longest output is done.
Several batch sizes are tried and the best (highest output tokens/s) is reported."""
from __future__ import annotations

import time

import torch

from benchmarks.stats import RequestRecord, RunResult
from benchmarks.workloads import Workload


class _FirstTokenClock:
    """A generate() streamer that only notes when the first new token appeared (the first
    `put` carries the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _run_batches(model, workload: Workload, batch_size: int, pad_id: int) -> tuple[list[RequestRecord], float, float]:
    """Records, wall seconds and this process's CPU seconds."""
    reqs = workload.requests
    records: list[RequestRecord] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(reqs), batch_size):
        batch = reqs[start:start + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        new = max(r.output_len for r in batch)
        clock = _FirstTokenClock()
        # min_new_tokens = max_new_tokens: EOS is suppressed, every row runs to the batch's end
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad_id, streamer=clock)
        end = time.perf_counter()
        first = clock.first_token_time or end
        records.extend(RequestRecord(len(r.prompt_ids), r.output_len, first - t0, end - t0) for r in batch)
    return records, time.perf_counter() - t0, time.process_time() - c0


def run(model_dir: str, workload: Workload, threads: int, dtype: str,
        batch_sizes: tuple[int, ...] = (16, 64)) -> RunResult:
    """Best of `batch_sizes`; `notes` holds the output tokens/s of every size tried. Only the
    requested output tokens count (padding and overrun past a request's length do not)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([list(workload.requests[0].prompt_ids[:16])]), max_new_tokens=4,
                       min_new_tokens=4, do_sample=False, pad_token_id=pad_id)
        best: tuple[float, list, float, int, float] | None = None
        tried = {}
        for bs in batch_sizes:
            records, wall, cpu = _run_batches(model, workload, min(bs, len(workload.requests)), pad_id)
            tok_s = workload.output_tokens / wall
            tried[str(bs)] = round(tok_s, 1)
            if best is None or tok_s > best[0]:
                best = (tok_s, records, wall, bs, cpu)
    _, records, wall, bs, cpu = best
    return RunResult("hf-static", workload.name, wall, records,
                     notes={"batch_size": bs, "output_tok_s_by_batch_size": tried, "cpu_s": round(cpu, 3)})
