"""The longest healthy engine step: one full `--max-num-batched-tokens` prefill chunk, the number
`--health-stall-seconds` must sit well above (a healthy step longer than it restarts the pod).

Builds the default model (or `--model`) as `conveyor serve` would, runs one short warm-up
request, then `--rounds` fresh prompts of exactly one chunk each (distinct tokens, so the prefix
cache never hits), and prints each prefill step's wall and process CPU time: CPU time well below
wall time times the threads means the machine was contended.
Usage: `python -m benchmarks.longest_step [--num-threads 2] [--max-num-batched-tokens 2048]`.
"""
from __future__ import annotations

import argparse
import os
import resource
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    args = build_parser().parse_args(argv)
    chunk = args.max_num_batched_tokens
    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.num_threads,
                                    max_num_batched_tokens=chunk, max_model_len=chunk + 16))
    vocab = engine.hf_config.vocab_size
    print(f"load average {os.getloadavg()[0]:.2f}, dtype {engine.dtype}, {args.num_threads} threads")
    for rnd in range(args.rounds + 1):  # round 0: the warm-up `conveyor serve` runs too
        n = 5 if rnd == 0 else chunk
        engine.add_request(f"r{rnd}", [(rnd * 7919 + 13 * j) % (vocab - 10) + 5 for j in range(n)],
                           SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished_requests():
            wall, cpu = time.perf_counter(), _cpu()
            engine.step()
            print(f"{'warm-up' if rnd == 0 else f'round {rnd}'}: {n}-token prefill step "
                  f"{time.perf_counter() - wall:.2f} s wall, {_cpu() - cpu:.2f} s CPU", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
