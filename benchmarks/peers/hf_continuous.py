"""`transformers`' own continuous batching (`init_continuous_batching`, transformers 5.x), with
its paged cache sized by hand (on CPU it cannot size itself)."""
from __future__ import annotations

import time

import torch

from benchmarks.stats import RequestRecord, RunResult
from benchmarks.workloads import Workload


def available() -> str | None:
    """None when the installed transformers has continuous batching, else why not."""
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
    except ImportError as e:
        return f"installed transformers has no continuous batching ({e})"
    return None


def run(model_dir: str, workload: Workload, threads: int, dtype: str, page_size: int = 16,
        max_batch_tokens: int = 2048) -> RunResult:
    """All requests are added at once, each with its own output length; TTFT comes from the
    per-token timestamps transformers records."""
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    blocks = sum(-(-(len(r.prompt_ids) + r.output_len) // page_size) for r in workload.requests)
    cb = ContinuousBatchingConfig(num_blocks=int(blocks * 1.25) + 8, page_size=page_size,
                                  max_batch_tokens=max_batch_tokens)
    # eos -1: no token ends a request early (ignore_eos)
    gen = GenerationConfig(max_new_tokens=max(r.output_len for r in workload.requests), do_sample=False,
                           eos_token_id=-1, pad_token_id=model.config.pad_token_id or 0)
    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cb, warmup=False) as manager:
        t0, c0 = time.perf_counter(), time.process_time()
        ids = [manager.add_request(list(r.prompt_ids), request_id=f"r{i}", max_new_tokens=r.output_len,
                                   record_timestamps=True) for i, r in enumerate(workload.requests)]
        results = {}
        while len(results) < len(ids):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped before finishing")
                continue
            if res.is_finished():
                results[res.request_id] = (res, time.perf_counter())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    records = []
    for rid, req in zip(ids, workload.requests):
        res, done = results[rid]
        n = len(res.generated_tokens)
        ttft = (res.timestamps[0] - t0) if res.timestamps else None
        err = res.error or (None if n == req.output_len else f"expected {req.output_len} tokens, got {n}")
        records.append(RequestRecord(len(req.prompt_ids), n, ttft, done - t0, error=err))
    return RunResult("hf-continuous", workload.name, wall, records,
                     notes={"num_blocks": cb.num_blocks, "max_batch_tokens": max_batch_tokens,
                            "cpu_s": round(cpu, 3)})
