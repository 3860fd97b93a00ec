"""Conveyor through `LLM.generate`, continuous batching or its static-batching scheduler mode."""
from __future__ import annotations

import time

from benchmarks.stats import RequestRecord, RunResult
from benchmarks.workloads import Workload


def kv_bytes_for(model_dir: str, workload: Workload, dtype_bytes: int = 2, block_size: int = 16) -> int:
    """KV-cache bytes that hold every request of `workload` at once (rounded up to blocks), plus
    a quarter for slack: the engine then never preempts, as peers sized for the workload don't."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype_bytes
    blocks = sum(-(-(len(r.prompt_ids) + r.output_len) // block_size) for r in workload.requests)
    return int(blocks * block_size * per_token * 1.25) + (1 << 20)


def run(model_dir: str | None, workload: Workload, threads: int, dtype: str, static: bool,
        max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, block_size: int = 16,
        sized_kv: bool = True, linear_backend: str = "auto") -> RunResult:
    """Generates the whole workload in one `generate` call after a short warm-up. TTFT and
    end-to-end latency come from the engine's per-request timestamps. `sized_kv`: a KV cache
    sized to hold the whole workload (as the peers get); False: the engine's default budget
    (`model_dir` None means the engine's default model, which needs that). `linear_backend`:
    EngineConfig's (auto: packed oneDNN on CPU; torch: BLAS)."""
    from engine import LLM, SamplingParams

    # The KV cache holds the model's dtype: 4 bytes a value in float32 (2 made the fp32 runs
    # preempt, since the budget then held 0.625x of the workload)
    kv = kv_bytes_for(model_dir, workload, 4 if dtype == "float32" else 2, block_size) if sized_kv else None
    llm = LLM(model=model_dir, dtype=dtype, num_threads=threads, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv, static_batching=static,
              block_size=block_size, linear_backend=linear_backend)
    warm = list(workload.requests[0].prompt_ids[:16])
    llm.generate([warm], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), use_tqdm=False)
    prompts = [list(r.prompt_ids) for r in workload.requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in workload.requests]
    t0, c0 = time.time(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.time() - t0, time.process_time() - c0
    records = []
    for req, out in zip(workload.requests, outs):
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        err = None if n == req.output_len else f"expected {req.output_len} tokens, got {n}"
        records.append(RequestRecord(len(req.prompt_ids), n, m.first_token_time - t0, m.finished_time - t0,
                                     error=err))
    name = "conveyor-static" if static else {"torch": "conveyor-blas", "onednn": "conveyor-onednn"}.get(linear_backend, "conveyor")
    return RunResult(name, workload.name, wall, records,
                     notes={"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                            "block_size": block_size, "kv_cache_bytes": kv, "linear_backend": linear_backend,
                            # CPU seconds of this process (all threads) over the generate call: on a
                            # shared machine, work per CPU-second is steadier than per wall-second
                            "cpu_s": round(cpu, 3)})
