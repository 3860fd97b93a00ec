"""Prefix-cache speed-up: many requests sharing one long system prompt, with caching on and off.

    python -m benchmarks.prefix_cache                      # 32 requests, 512-token shared prefix
    python -m benchmarks.prefix_cache --requests 8 --prefix 256 --quick

Both engines run the same model, dtype, threads and requests (token ids, EOS ignored), one after
the other, alternating for --rounds rounds. Reports wall time, prompt tokens actually computed,
mean TTFT and the speed-up of caching on over off.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from engine import LLM, SamplingParams


def workload(num_requests: int, prefix_len: int, suffix_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 40000) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(100, 40000) for _ in range(suffix_len)] for _ in range(num_requests)]


def run_once(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    hits0 = engine.kv.prefix_cache_hits
    start = time.perf_counter()
    # the first request warms the cache, as a system prompt seen before would
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    prompt_tokens = sum(len(p) for p in prompts)
    cached = engine.kv.prefix_cache_hits - hits0
    return {"wall_s": wall, "ttft_mean_s": statistics.mean(ttft), "computed_prompt_tokens": prompt_tokens - cached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir or GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    prompts = workload(args.requests, args.prefix, args.suffix)
    engines = {
        "cache on": LLM(args.model, dtype=args.dtype, num_threads=args.threads, enable_prefix_caching=True),
        "cache off": LLM(args.model, dtype=args.dtype, num_threads=args.threads, enable_prefix_caching=False),
    }
    for llm in engines.values():  # warm-up outside the timing
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, llm in engines.items():
            # a new shared prefix per round, so cached blocks from the last round don't help
            prompts = workload(args.requests, args.prefix, args.suffix, seed=r)
            results[name].append(run_once(llm, prompts, args.max_tokens))
    print(f"{args.requests} requests, {args.prefix}-token shared prefix + {args.suffix}-token suffix, "
          f"{args.max_tokens} output tokens, {args.dtype}, {args.threads} threads, {args.rounds} rounds (median)")
    print("| setting | wall s | mean TTFT s | prompt tokens computed |\n|---|---|---|---|")
    med = {}
    for name, runs in results.items():
        med[name] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        m = med[name]
        print(f"| {name} | {m['wall_s']:.2f} | {m['ttft_mean_s']:.2f} | {m['computed_prompt_tokens']:.0f} |")
    on, off = med["cache on"], med["cache off"]
    print(f"speed-up (wall): {off['wall_s'] / on['wall_s']:.2f}x; "
          f"TTFT: {off['ttft_mean_s'] / on['ttft_mean_s']:.2f}x")


if __name__ == "__main__":
    main()
