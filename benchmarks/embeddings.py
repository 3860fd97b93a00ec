"""Embedding throughput, and what pooling costs over a plain prefill.

    python -m benchmarks.embeddings                       # 64 inputs of 128 tokens, default model
    python -m benchmarks.embeddings --inputs 16 --tokens 64 --rounds 1

Runs the same token-id inputs (random ids, so no prefix-cache hits) through one engine as
embedding requests (`LLM.embed`, mean pooling) and as one-token generations (a prefill plus one
sampled token: the cheapest generation request), alternating for --rounds rounds, and reports
the median wall time, inputs/s and prompt tokens/s of each.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from engine import LLM, SamplingParams


def workload(num_inputs: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(num_tokens)] for _ in range(num_inputs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint or GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per input")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False)
    prompts = workload(args.inputs, args.tokens)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.embed(prompts[:2])  # warm-up
    times: dict[str, list[float]] = {"embed (mean pooling)": [], "prefill + 1 token": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        vectors = llm.embed(prompts)
        times["embed (mean pooling)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times["prefill + 1 token"].append(time.perf_counter() - start)
    assert len(vectors) == len(prompts)
    total = args.inputs * args.tokens
    print(f"{args.inputs} inputs x {args.tokens} tokens, dim {len(vectors[0])}, dtype {llm.engine.dtype}, "
          f"median of {args.rounds}")
    for name, walls in times.items():
        wall = statistics.median(walls)
        print(f"{name:22s} {wall:7.3f} s  {args.inputs / wall:8.1f} inputs/s  {total / wall:9.0f} tokens/s")


if __name__ == "__main__":
    main()
