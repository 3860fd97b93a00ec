"""Tensor parallel vs one process, offline: the same requests through `LLM` with
tensor_parallel_size 1 (1 and 2 threads) and 2 (two processes of 1 thread each), same greedy
tokens checked; plus how much of a decode step the replicated LM head costs on rank 0 (what a
vocab-parallel head could at best halve).

    python -m benchmarks.tp_benchmark                 # 56M random Llama, 16 requests 64 -> 32, ~3 min idle
    python -m benchmarks.tp_benchmark --quick         # tiny Llama, seconds

On a 2-core CPU, TP=2 is expected to be slower than one process with 2 threads: every layer
adds two all-reduces through loopback sockets, and the matmuls are small. The point of TP is
memory and bandwidth across devices (docs/scaling.md); this records its CPU cost honestly.
Results go to benchmarks/out/tp_benchmark.json; the figures in RESULTS.md name load and machine.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.throughput import LLAMA_56M, LLAMA_TINY, machine_info, make_random_llama


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes `pids` (all ranks of a run): on a
    loaded machine a steadier measure of cost than wall time, which depends on the CPU share."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run(model: str, tp: int, threads: int, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict:
    import torch

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=tp, num_threads=threads, dtype=dtype, device="cpu",
              num_blocks=2048, block_size=16)
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)  # warm
    pids = [os.getpid()] + [p.pid for p in (llm.engine.workers.processes if llm.engine.workers else [])]
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
    engine = llm.engine
    # Decode-step time at the full batch, and the LM head's share of it (rank 0 only computes it).
    for i, p in enumerate(prompts):
        engine.add_request(f"d{i}", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    engine.step()  # prefill
    steps = []
    while engine.has_unfinished_requests():
        s0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - s0)
    weight = engine.model.lm_head_weight()  # rank 0's rows (all of them unless vocab-parallel)
    hidden = torch.randn(len(prompts), weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(hidden, weight)
        h0 = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(hidden, weight)
        head_ms = (time.perf_counter() - h0) / 10 * 1000
    engine.close()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    steps.sort()
    return {"tp": tp, "threads_per_rank": threads, "start_s": round(start_s, 1), "wall_s": round(wall, 2),
            "out_tok_s": round(n_out / wall, 1), "cpu_ms_per_token": round(cpu / n_out * 1000, 1), "decode_step_ms_median": round(steps[len(steps) // 2] * 1000, 1),
            "lm_head_ms": round(head_ms, 2), "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 requests")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", default="1x1,1x2,2x1",
                    help="comma-separated TPxTHREADS runs (1x2: one process, 2 threads; 2x1: TP=2, 1 thread each)")
    ap.add_argument("--out", default="benchmarks/out/tp_benchmark.json")
    args = ap.parse_args(argv)
    shape, n = (LLAMA_TINY, 4) if args.quick else (LLAMA_56M, args.num_requests)
    model = make_random_llama(os.path.join(tempfile.gettempdir(), f"conveyor-tp-bench-{shape['hidden_size']}"), shape)
    prompts = [[(31 * i + 7 * j) % 40000 + 100 for j in range(args.prompt_len)] for i in range(n)]
    info = machine_info()
    runs = [tuple(int(x) for x in r.split("x")) for r in args.runs.split(",")]
    results = [run(model, tp, threads, prompts, args.max_tokens, args.dtype) for tp, threads in runs]
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    info["load_avg_after"] = os.getloadavg()
    print(f"machine: {info['cpu']} ({info['cores']} CPUs, {info['torch_cpu_capability']}), "
          f"load {info['load_avg']} -> {info['load_avg_after']}, {info['date']}")
    print(f"model: {shape}, {n} requests {args.prompt_len} -> {args.max_tokens}, {args.dtype}; "
          f"greedy tokens identical across runs: {same}")
    print("| TP | threads/rank | start s | wall s | out tok/s | CPU ms/token (all ranks) | decode step ms (median) "
          "| LM head ms (rank 0) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['tp']} | {r['threads_per_rank']} | {r['start_s']} | {r['wall_s']} | {r['out_tok_s']} | "
              f"{r['cpu_ms_per_token']} | {r['decode_step_ms_median']} | {r['lm_head_ms']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "shape": shape, "identical_tokens": same,
                   "results": [{k: v for k, v in r.items() if k != "tokens"} for r in results]}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
