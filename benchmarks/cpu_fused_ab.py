"""The fused C++ CPU elementwise kernels (`engine/kernels/csrc/fused_ops.cpp`) against the torch
bodies they replace (`engine/kernels/ops.py`), side by side in one process.

Part 1, per op: `ops.rms_norm` (with and without the residual), `ops.apply_rotary` (q and k as
views into a fused QKV output, as the model passes them) and `ops.silu_and_mul` against their
`*_torch` references, on the shapes of a batch-32 decode step and of a 2,048-token prefill chunk,
for hidden 512 (the 56M benchmark Llama: 8 heads, 4 KV heads, head_dim 64, intermediate 1536) and
576 (SmolLM2-135M: 9 heads, 3 KV heads, intermediate 1536). The two arms alternate order round
after round; figures are medians of the rounds (min in brackets), microseconds per call.

Part 2, end to end: `LLM.generate`, greedy, 32 requests of 128 prompt tokens -> 64 new tokens on
the 56M Llama (`--model`; a tiny random Llama when absent), with the fused kernels on, and off
(`ops._use_cpu_kernel` patched to refuse in this process only: the C++ attention stays on in both
arms), after one untimed run of each. Arms alternate; the greedy tokens of the two arms are
compared.

    python -m benchmarks.cpu_fused_ab --rounds 3 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch

from benchmarks.cpu_attention import machine
from engine.kernels import ops

DEFAULT_MODEL = "benchmarks/out/h14_run2/models/llama-56m"
SHAPES = {  # name: (hidden, heads, kv heads, head_dim, intermediate)
    "56M": (512, 8, 4, 64, 1536),
    "SmolLM2": (576, 9, 3, 64, 1536),
}


@contextmanager
def fused(enabled: bool):
    """The dispatch as shipped (enabled), or the torch bodies everywhere (not enabled)."""
    original = ops._use_cpu_kernel
    if not enabled:
        ops._use_cpu_kernel = lambda *tensors: False
    try:
        yield
    finally:
        ops._use_cpu_kernel = original


def op_cases(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int):
    """name -> (torch call, fused call) on fresh random tensors of one step's shapes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    res = torch.randn(tokens, hidden, generator=gen)
    w = torch.rand(hidden, generator=gen) + 0.5
    gate_up = torch.randn(tokens, 2 * inter, generator=gen)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 100  # unit cos/sin: repeats stay finite
    cos, sin = angles.cos(), angles.sin()
    return {
        "add + rms_norm": (lambda: ops.rms_norm_torch(x, w, 1e-5, res), lambda: ops.rms_norm(x, w, 1e-5, res)),
        "rms_norm": (lambda: ops.rms_norm_torch(x, w, 1e-5), lambda: ops.rms_norm(x, w, 1e-5)),
        "rotary q+k": (lambda: ops.apply_rotary_torch(q, k, cos, sin), lambda: ops.apply_rotary(q, k, cos, sin)),
        "silu_and_mul": (lambda: ops.silu_and_mul_torch(gate_up), lambda: ops.silu_and_mul(gate_up)),
    }


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def bench_ops(rounds: int, target_s: float) -> None:
    print("\n## Per op, float32, microseconds per call: median [min] of", rounds, "rounds\n")
    print("| model | step | op | torch us | fused us | speed-up |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    cases = [(model, step, name, fns) for model, (hidden, heads, kv_heads, head_dim, inter) in SHAPES.items()
             for step, tokens in (("decode b32", 32), ("prefill 2048", 2048))
             for name, fns in op_cases(tokens, hidden, heads, kv_heads, head_dim, inter).items()]
    for *_, fns in cases:  # warm-up: glibc raises its mmap threshold after the first big frees
        for fn in fns * 2:
            fn()
    for model, step, name, (ref, new) in cases:
        reps = max(3, round(target_s / _time(ref, 1)))
        times = {"torch": [], "fused": []}
        for i in range(rounds):
            arms = [("torch", ref), ("fused", new)]
            for label, fn in arms if i % 2 == 0 else arms[::-1]:
                times[label].append(_time(fn, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {model} | {step} | {name} | {med['torch'] * 1e6:.1f} [{min(times['torch']) * 1e6:.1f}] | "
              f"{med['fused'] * 1e6:.1f} [{min(times['fused']) * 1e6:.1f}] | {med['torch'] / med['fused']:.2f}x |")


def bench_engine(model: str | None, rounds: int, threads: int, requests: int, prompt_len: int, out_len: int) -> None:
    from engine import LLM, SamplingParams

    if model is None or not os.path.isdir(model):
        import tempfile

        from tests.checkpoints import make_tiny_checkpoint

        model = make_tiny_checkpoint(tempfile.mkdtemp(prefix="fused_ab_"), "llama")
    llm = LLM(model=model, dtype="float32", num_threads=threads, max_num_seqs=256, max_num_batched_tokens=2048)
    vocab = llm.engine.hf_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, vocab - 5, (prompt_len,), generator=gen).tolist() for _ in range(requests)]
    params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0)
    for on in (True, False):  # warm-up: oneDNN primitives for every batch shape, allocator growth
        with fused(on):
            llm.generate(prompts, params, use_tqdm=False)
    print(f"\n## End to end: LLM.generate on {model}, float32, {requests} requests {prompt_len} -> {out_len} "
          f"tokens greedy, {threads} thread(s)\n")
    print("| round | arm | wall s | CPU s | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    walls, tokens = {True: [], False: []}, {}
    for i in range(rounds):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            with fused(on):
                t0, c0 = time.perf_counter(), time.process_time()
                outs = llm.generate(prompts, params, use_tqdm=False)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens[on] = [o.outputs[0].token_ids for o in outs]
            walls[on].append(wall)
            label = "fused" if on else "torch"
            print(f"| {i} | {label} | {wall:.2f} | {cpu:.2f} | {requests * out_len / wall:.1f} |")
    med = {on: statistics.median(v) for on, v in walls.items()}
    # each round runs both arms back to back: its ratio cancels the drift of a shared machine
    paired = sorted(t / f for t, f in zip(walls[False], walls[True]))
    same = sum(a == b for a, b in zip(tokens[True], tokens[False]))
    print(f"\nMedian wall: torch {med[False]:.2f} s, fused {med[True]:.2f} s ({med[False] / med[True]:.3f}x); "
          f"per-round torch/fused ratios {', '.join(f'{r:.3f}' for r in paired)} "
          f"(median {statistics.median(paired):.3f}); greedy tokens identical for {same}/{requests} requests")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-s", type=float, default=0.2, help="seconds per arm per op per round")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--lens", default="128,64", help="prompt,output tokens")
    ap.add_argument("--skip-ops", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engine.kernels.cpu_extension import cpu_ops_available

    if not cpu_ops_available():
        raise SystemExit("the C++ CPU extension could not be built on this machine (see the log)")
    print(f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.skip_ops:
        with torch.inference_mode():
            bench_ops(args.rounds, args.target_s)
    if not args.skip_engine:
        prompt_len, out_len = (int(v) for v in args.lens.split(","))
        bench_engine(args.model, args.rounds, args.threads, args.requests, prompt_len, out_len)
    print(f"\nLoad average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
