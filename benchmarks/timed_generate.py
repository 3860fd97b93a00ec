"""One timed `LLM.generate` over a workload, as the fresh-process A/B scripts measure it
(benchmarks/checkout_ab.py, benchmarks/panel_storage_ab.py): a 4-token warm-up on the first
prompt's first 16 tokens, then every request greedy with EOS ignored; wall and CPU seconds of
the generate call alone, the output token count, and a digest of the tokens (two sides that
must agree compare it)."""
from __future__ import annotations

import hashlib
import json
import time


def timed_generate(llm, workload) -> dict:
    from engine import SamplingParams

    llm.generate([list(workload.requests[0].prompt_ids[:16])],
                 SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), use_tqdm=False)
    prompts = [list(r.prompt_ids) for r in workload.requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in workload.requests]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {"wall_s": wall, "cpu_s": cpu, "out_tokens": sum(map(len, tokens)),
            "tokens_sha": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]}
