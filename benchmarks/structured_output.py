"""Structured-output cost: decode throughput of a batch where half the requests carry a JSON
schema vs the same batch unconstrained, and the time to first token of a request whose schema
was never seen (compiled on the worker thread while it waits) vs a cached schema vs none, and
the TTFT of an unconstrained request sent beside a cold vs a cached schema.

    python -m benchmarks.structured_output              # default model, float32, 16 x 64 tokens
    python -m benchmarks.structured_output --requests 8 --max-tokens 32 --rounds 1

Every request generates exactly --max-tokens tokens (unconstrained ones ignore EOS; the schema,
an array of at least 200 strings, cannot finish earlier), so both batches do the same work.
Rounds alternate constrained / unconstrained; medians are reported. The engine's vocabulary
table for the grammar engine is built once, before timing (the first structured request of a
process pays about a second for it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputsParams

LONG_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}


def _cold_schema() -> dict:
    """A schema never seen before (a fresh property name), of typical size."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "age"],
            "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                           f"x_{uuid.uuid4().hex[:8]}": {"type": "boolean"}}}


def throughput(llm: LLM, n: int, max_tokens: int, constrained: bool) -> float:
    params = []
    for i in range(n):
        spec = StructuredOutputsParams(json=LONG_SCHEMA) if constrained and i % 2 == 0 else None
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=spec is None,
                                     structured_outputs=spec))
    start = time.perf_counter()
    outs = llm.generate([f"Request {i}: list some words." for i in range(n)], params, use_tqdm=False)
    wall = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / wall


def ttft(llm: LLM, schema: dict | None) -> float:
    spec = StructuredOutputsParams(json=schema) if schema is not None else None
    out = llm.generate(["Describe a person as JSON."], SamplingParams(max_tokens=1, temperature=0,
                                                                     structured_outputs=spec), use_tqdm=False)[0]
    return out.metrics.first_token_time - out.metrics.arrival_time


def neighbour_ttft(llm: LLM, schema: dict) -> float:
    """TTFT of an unconstrained request submitted in the same call as one carrying `schema`:
    with a cold schema, what the compilation costs everyone else."""
    spec = StructuredOutputsParams(json=schema)
    outs = llm.generate(["Say something.", "Describe a person as JSON."],
                        [SamplingParams(max_tokens=1, temperature=0),
                         SamplingParams(max_tokens=1, temperature=0, structured_outputs=spec)], use_tqdm=False)
    return outs[0].metrics.first_token_time - outs[0].metrics.arrival_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttft-samples", type=int, default=5)
    ap.add_argument("--skip-throughput", action="store_true", help="only the TTFT and compile-time part")
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype)
    llm.engine.structured.submit(StructuredOutputsParams(json=LONG_SCHEMA)).result()  # vocabulary table
    throughput(llm, 2, 4, True)  # warm-up
    free, mixed = [], []
    for _ in range(0 if args.skip_throughput else args.rounds):
        free.append(throughput(llm, args.requests, args.max_tokens, False))
        mixed.append(throughput(llm, args.requests, args.max_tokens, True))
    cold, cached, plain, compile_s, beside_cold, beside_cached = [], [], [], [], [], []
    for _ in range(args.ttft_samples):
        start = time.perf_counter()  # the compilation alone, on the worker thread
        llm.engine.structured.submit(StructuredOutputsParams(json=_cold_schema())).result()
        compile_s.append(time.perf_counter() - start)
        schema = _cold_schema()
        cold.append(ttft(llm, schema))
        cached.append(ttft(llm, schema))
        plain.append(ttft(llm, None))
        schema = _cold_schema()
        beside_cold.append(neighbour_ttft(llm, schema))
        beside_cached.append(neighbour_ttft(llm, schema))
    result: dict = {"requests": args.requests, "max_tokens": args.max_tokens, "dtype": args.dtype}
    if free:
        f, m = statistics.median(free), statistics.median(mixed)
        result.update(unconstrained_tok_s=round(f, 1), half_constrained_tok_s=round(m, 1), ratio=round(m / f, 3))
    result.update({
        "compile_cold_schema_ms": round(statistics.median(compile_s) * 1e3, 1),
        "ttft_no_schema_ms": round(statistics.median(plain) * 1e3, 1),
        "ttft_cached_schema_ms": round(statistics.median(cached) * 1e3, 1),
        "ttft_cold_schema_ms": round(statistics.median(cold) * 1e3, 1),
        "cold_minus_cached_ms": round((statistics.median(cold) - statistics.median(cached)) * 1e3, 1),
        # an unconstrained request's TTFT beside a cold vs a cached schema: the cold compile's cost to others
        "neighbour_ttft_beside_cold_ms": round(statistics.median(beside_cold) * 1e3, 1),
        "neighbour_ttft_beside_cached_ms": round(statistics.median(beside_cached) * 1e3, 1),
    })
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
