"""The C++ CPU attention kernel against an earlier version of itself, side by side in one process.

The earlier source (`git show REV:engine/kernels/csrc/paged_attention.cpp`, with the headers of
REV's csrc/ next to it) is built under another op namespace (`conveyor_cpu_base`, its C++
namespaces renamed likewise), so both kernels run on the same tensors, interleaved
round after round (a busy machine slows them alike). Only the kernel call is timed (the K/V of
the new tokens are already in the cache), on scattered blocks of 16 slots, one kernel first in
even rounds, the other in odd ones:

- decode batch 32 at 256- and 1K-token contexts and at 150-640 (the offline benchmark's mix),
  with the 56M random Llama's heads (8 query heads, 4 KV heads, head_dim 64);
- decode batch 16 at 1K and a fresh 2048-token prefill, with SmolLM2-135M's (9 heads, 3 KV heads);
- a 2048-token prefill chunk of the offline mixed workload (prompts of 16-512 tokens), 56M heads.

Figures are medians of the rounds (min in brackets), ms per call; GB/s (decodes only) counts each
sequence's K and V once, what a decode reads; GFLOP/s counts 4 * head_dim per (query head,
visible key). The two kernels' outputs are checked to agree first. Then the K/V cache write:
torch_attention.write_kv (two index_copy_) against the C++ write_kv_cache, interleaved likewise.

    python -m benchmarks.cpu_attention_ab --against 9256104 --rounds 3 --threads 1
    python -m benchmarks.cpu_attention_ab --step   # also whole decode steps of the default model, 1K contexts
    python -m benchmarks.cpu_attention_ab --cold 10 --cpu-time   # decodes on caches past the L3, and
                                                                 # a streaming read for comparison
"""
from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.cpu_attention import bench_decode_step, machine
from engine.attention_metadata import AttentionMetadata

CSRC = "engine/kernels/csrc"
SOURCE = f"{CSRC}/paged_attention.cpp"
BLOCK, HEAD_DIM = 16, 64
CASES = {  # name: (heads, kv heads, query lengths, context lengths)
    "56M decode b32 x 256": (8, 4, [1] * 32, [256] * 32),
    "56M decode b32 x 1K": (8, 4, [1] * 32, [1024] * 32),
    "56M decode b32 x 150-640": (8, 4, [1] * 32, [150 + (490 * i) // 31 for i in range(32)]),
    "SmolLM2 decode b16 x 1K": (9, 3, [1] * 16, [1024] * 16),
    "SmolLM2 prefill 2048": (9, 3, [2048], [2048]),
    # a 2048-token prefill chunk of the offline mixed workload: fresh prompts of 16-441 tokens and
    # the first 451 tokens of a 512-token one (prompts 16-512)
    "56M prefill 2048 x 16-512": (8, 4, [16 + 496 * i // 7 for i in range(7)] + [451],
                                  [16 + 496 * i // 7 for i in range(7)] + [451]),
}


def build_baseline(rev: str):
    """Builds the kernel of git revision `rev` under the op namespace conveyor_cpu_base: its
    paged_attention.cpp (one file up to the split into headers, the op and driver since) with every
    header of that revision's csrc/ beside it. The op namespace and the sources' own C++ namespaces
    get a `_base` suffix in all of them, so no symbol of the baseline can stand in for the working
    tree's; the headers' digest goes into the source, hence into the build's cache key."""
    from engine.kernels import cpu_extension

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout

    listing = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{CSRC}/"], capture_output=True, text=True,
                             check=True).stdout.split()
    texts = {Path(path).name: show(path) for path in listing if path.endswith(".h")}
    texts[Path(SOURCE).name] = show(SOURCE)
    names = {"conveyor_cpu"} | {n for text in texts.values() for n in re.findall(r"\bnamespace (conveyor_\w+)", text)}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    folder = Path(tempfile.mkdtemp(prefix="conveyor_base_"))
    digest = hashlib.sha256()
    for name, text in sorted(texts.items()):
        text = pattern.sub(r"\1_base", text)
        digest.update(text.encode())
        (folder / name).write_text(text)
    path = folder / Path(SOURCE).name
    path.write_text(f"// baseline {rev}, headers and source {digest.hexdigest()}\n" + path.read_text())
    if not cpu_extension.build_and_load(sources=(path,)):
        raise SystemExit(f"the kernel of {rev} did not build (see the log)")
    return torch.ops.conveyor_cpu_base.paged_attention


def make_case(heads: int, kv_heads: int, query_lens: list[int], seq_lens: list[int], dtype: torch.dtype, seed: int = 0):
    """q, a cache filled with random K/V on shuffled blocks, and the kernel's metadata."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-s // BLOCK) for s in seq_lens]
    perm = (torch.randperm(sum(needed), generator=gen) + 1).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(perm[used : used + n])
        used += n
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK)
    cache = torch.randn(2, sum(needed) + 1, BLOCK, kv_heads, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), heads, HEAD_DIM, generator=gen).to(dtype)
    args = (q, cache, meta.block_tables.to(torch.int32).contiguous(), meta.seq_lens.to(torch.int32),
            meta.query_start_loc.to(torch.int32))
    kv_bytes = sum(seq_lens) * kv_heads * HEAD_DIM * 2 * cache.element_size()
    flops = sum(4 * HEAD_DIM * heads * sum(range(s - ql + 1, s + 1)) for ql, s in zip(query_lens, seq_lens))
    return args, kv_bytes, flops


def _time(op, args, reps: int, clock=time.perf_counter) -> float:
    """Seconds per call; `args` is one case or a list of them (each call takes the next one, so
    with --cold every call finds its cache out of the CPU's caches, as a model's layers do)."""
    cases = args if isinstance(args, list) else [args]
    out = torch.empty_like(cases[0][0])
    op(out, *cases[0], HEAD_DIM**-0.5)
    t0 = clock()
    for i in range(reps * len(cases)):
        op(out, *cases[i % len(cases)], HEAD_DIM**-0.5)
    return (clock() - t0) / (reps * len(cases))


def bench_kv_write(rounds: int, target_s: float, clock, dtype: torch.dtype) -> None:
    """write_kv (index_copy_ into the cache, what the CPU backend called before) against the C++
    write_kv_cache, interleaved: a 2048-token prefill chunk and a 32-token decode step of the 56M
    model's K/V (4 KV heads, head_dim 64) into shuffled slots, k/v as views of a fused projection."""
    from engine.kernels.torch_attention import write_kv

    print(f"\n## K/V cache write, {dtype} k/v and cache, ms per call: median [min] of {rounds} rounds\n")
    print("| tokens | write_kv (index_copy_) | write_kv_cache (C++) | speed-up | C++ GB/s written |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    ops = {"torch": write_kv, "c++": torch.ops.conveyor_cpu.write_kv_cache}
    for tokens in (2048, 32):
        gen = torch.Generator().manual_seed(1)
        cache = torch.zeros(2, 512, BLOCK, 4, HEAD_DIM, dtype=dtype)
        fused = torch.randn(tokens, 16, HEAD_DIM, generator=gen).to(dtype)
        kv_args = (fused[:, 8:12], fused[:, 12:16], cache, torch.randperm(512 * BLOCK, generator=gen)[:tokens])
        one = max(1e-6, min(_time_call(op, kv_args, 3, clock) for op in ops.values()))
        reps = max(3, round(target_s / 4 / one))
        times = {label: [] for label in ops}
        for i in range(rounds):
            for label, op in (list(ops.items()) if i % 2 == 0 else list(ops.items())[::-1]):
                times[label].append(_time_call(op, kv_args, reps, clock))
        med = {label: statistics.median(t) for label, t in times.items()}
        written = 2 * tokens * 4 * HEAD_DIM * cache.element_size()
        print(f"| {tokens} | {med['torch'] * 1e3:.3f} [{min(times['torch']) * 1e3:.3f}] | "
              f"{med['c++'] * 1e3:.3f} [{min(times['c++']) * 1e3:.3f}] | {med['torch'] / med['c++']:.2f}x | "
              f"{written / med['c++'] / 1e9:.1f} |")


def _time_call(op, args, reps: int, clock) -> float:
    op(*args)
    t0 = clock()
    for _ in range(reps):
        op(*args)
    return (clock() - t0) / reps


def stream_read_gbs(clock, rounds: int = 3) -> float:
    """What one thread streams from memory: the best of `rounds` sums over a 1 GiB float32 tensor."""
    big = torch.ones(2**28)
    best = 0.0
    for _ in range(rounds):
        t0 = clock()
        big.sum()
        best = max(best, big.numel() * 4 / (clock() - t0) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="9256104", help="git revision of the baseline kernel source")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="q and cache dtype")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the calling thread's CPU time, not wall time (with --threads 1, on a busy machine)")
    ap.add_argument("--step", action="store_true", help="then decode steps of the default model with each kernel")
    ap.add_argument("--target-s", type=float, default=0.3, help="seconds per variant per case per round")
    ap.add_argument("--cold", type=int, default=1, metavar="N",
                    help="decode cases on N caches called in turn (10: ~250 MB for the 56M decodes, far past "
                         "the L3, as the layers of a decode step); 1: one cache, warm in the L3")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engine.kernels.cpu_extension import cpu_ops_available

    if not cpu_ops_available():
        raise SystemExit("the C++ CPU attention extension could not be built on this machine (see the log)")
    ops = {"base": build_baseline(args.against), "new": torch.ops.conveyor_cpu.paged_attention}
    dtype = getattr(torch, args.dtype)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.cold > 1:
        print(f"Streaming read of a 1 GiB tensor (torch sum, 1 thread): {stream_read_gbs(clock):.1f} GB/s")
    print(f"\n## Kernel {args.against} (base) vs working tree (new), {args.dtype}, "
          f"{'CPU' if args.cpu_time else 'wall'} ms per call: "
          f"median [min] of {args.rounds} rounds\n")
    print("| case | base ms | new ms | speed-up | base GB/s | new GB/s | base GFLOP/s | new GFLOP/s |")
    print("| --- |" + " ---: |" * 7)
    for name, (heads, kv_heads, query_lens, seq_lens) in CASES.items():
        case_args, kv_bytes, flops = make_case(heads, kv_heads, query_lens, seq_lens, dtype)
        if args.cold > 1 and max(query_lens) == 1:  # other caches (and shuffles) of the same shapes
            case_args = [case_args] + [make_case(heads, kv_heads, query_lens, seq_lens, dtype, seed)[0]
                                       for seed in range(1, args.cold)]
        elif args.cold > 1:
            continue  # --cold measures the decodes
        first = case_args[0] if isinstance(case_args, list) else case_args
        outs = {}
        for label, op in ops.items():
            outs[label] = torch.empty_like(first[0])
            op(outs[label], *first, HEAD_DIM**-0.5)
        diff = (outs["base"].float() - outs["new"].float()).abs().max().item()
        assert diff < (1e-4 if dtype == torch.float32 else 3e-2), f"{name}: kernels disagree by {diff}"
        if isinstance(case_args, list):
            name += f" (cold: {len(case_args)} caches)"
        reps = max(1, round(args.target_s / _time(ops["base"], case_args, 1)))
        times = {label: [] for label in ops}
        for i in range(args.rounds):  # the order alternates, so neither kernel always runs first
            for label, op in (list(ops.items()) if i % 2 == 0 else list(ops.items())[::-1]):
                times[label].append(_time(op, case_args, reps, clock))
        med = {label: statistics.median(t) for label, t in times.items()}
        cells = [f"{med[k] * 1e3:.3f} [{min(times[k]) * 1e3:.3f}]" for k in ops]
        decode = max(query_lens) == 1  # a prefill re-reads K/V per query tile: GB/s would mislead
        rates = [f"{kv_bytes / med[k] / 1e9:.1f}" if decode else "-" for k in ops]
        rates += [f"{flops / med[k] / 1e9:.1f}" for k in ops]
        print(f"| {name} | " + " | ".join(cells) + f" | {med['base'] / med['new']:.2f}x | " + " | ".join(rates) + " |")
    if args.cold == 1:
        bench_kv_write(args.rounds, args.target_s, clock, dtype)
    if args.step:
        from engine.kernels.cpu_attention import CpuPagedAttentionBackend

        bench_decode_step(args.rounds, 1024, 16, 5, {f"C++ kernel {args.against}": CpuPagedAttentionBackend(ops["base"]),
                                                     "C++ kernel (new)": CpuPagedAttentionBackend()})
    print(f"\nLoad average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
