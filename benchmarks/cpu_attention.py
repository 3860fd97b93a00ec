"""CPU attention: the old advanced-index gather, the index_select gather and the C++ kernel.

Part 1 times one attention call (one layer) for SmolLM2-135M's shapes (9 heads, 3 KV heads,
head_dim 64, block size 16): decode at batch 16 with 128- and 1K-token contexts, a fresh 512-token
prefill and a 512-token chunk over 512 cached tokens. Part 2 times whole decode steps of the
default model (`LLM(dtype="float32")`, batch 16 at ~1K-token contexts) with the torch path and with
the C++ kernel, and the share of each step spent in attention. Variants run interleaved, round
after round, so a busy machine slows them alike; figures are medians (min in brackets).

    python -m benchmarks.cpu_attention                 # both parts, 2 rounds, 2 threads
    python -m benchmarks.cpu_attention --part kernels --rounds 3 --threads 1
    python -m benchmarks.cpu_attention --part recompute   # bf16 outputs with/without preemption
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import time

import torch

from engine.attention_metadata import AttentionMetadata
from engine.kernels.torch_attention import TorchAttentionBackend, _causal_sdpa, gather_slots, write_kv

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
CASES = {  # name: (query lengths, context lengths)
    "decode b16 x 128": ([1] * 16, [128] * 16),
    "decode b16 x 1K": ([1] * 16, [1024] * 16),
    "prefill 512": ([512], [512]),
    "chunk 512 after 512": ([512], [1024]),
}


class AdvancedIndexGather(TorchAttentionBackend):
    """The torch path before index_select: K/V gathered with a 3-D advanced index."""

    name = "gather"

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                                    max(meta.seq_lens_cpu[:nd]), meta.block_size, scale)
        start = nd
        for i in range(nd, meta.num_seqs):
            q_len, ctx = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            end = start + q_len
            if q_len == ctx:
                ki, vi = k[start:end], v[start:end]
            else:
                slots = gather_slots(meta.block_tables[i], ctx, meta.block_size)
                ki, vi = kv_cache[0].view(-1, *k.shape[1:])[slots], kv_cache[1].view(-1, *v.shape[1:])[slots]
            out[start:end] = _causal_sdpa(q[start:end], ki, vi, scale)
            start = end
        return out

    @staticmethod
    def _decode(q, kv_cache, block_tables, seq_lens, max_len, block_size, scale):
        nd, num_heads, head_dim = q.shape
        kvh = kv_cache.shape[3]
        pos = torch.arange(max_len)
        slots = block_tables[:, pos // block_size].to(torch.int64) * block_size + pos % block_size
        rows = slots[:, None, :] * kvh + torch.arange(kvh)[None, :, None]
        keys, values = kv_cache[0].view(-1, head_dim)[rows], kv_cache[1].view(-1, head_dim)[rows]
        scores = torch.matmul(q.view(nd, kvh, num_heads // kvh, head_dim), keys.transpose(-1, -2)).float() * scale
        scores.masked_fill_(~(pos[None, :] < seq_lens[:, None])[:, None, None, :], float("-inf"))
        return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values).reshape(nd, num_heads, head_dim)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
        flags = next(line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags"))
        simd = " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model, simd = platform.processor(), "?"
    load = open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else "?"
    return (f"{model}; {simd}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
            f"{torch.get_num_threads()} threads; load average {' '.join(load)}")


def _batch(query_lens, seq_lens, dtype):
    tables, next_block = [], 1
    for length in seq_lens:
        n = -(-length // BLOCK)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, next_block, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, HEAD_DIM, generator=gen).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, cache, meta


def _time(fn, reps: int, clock=time.perf_counter) -> float:
    fn()
    t0 = clock()
    for _ in range(reps):
        fn()
    return (clock() - t0) / reps


def bench_kernels(rounds: int, dtype: torch.dtype, cpu_time: bool = False) -> None:
    from engine.kernels.cpu_attention import CpuPagedAttentionBackend

    backends = [AdvancedIndexGather(), TorchAttentionBackend(), CpuPagedAttentionBackend()]
    labels = {"gather": "advanced-index gather", "torch": "index_select gather", "cpu": "C++ kernel"}
    clock = time.thread_time if cpu_time else time.perf_counter
    what = "CPU time of the calling thread" if cpu_time else "wall time"
    print(f"\n## One attention call (one layer), {dtype}, {what}, ms: median [min] of {rounds} rounds\n")
    print("| case | " + " | ".join(labels[b.name] for b in backends) + " | gather / kernel | index_select / kernel |")
    print("| --- |" + " ---: |" * (len(backends) + 2))
    for case, (query_lens, seq_lens) in CASES.items():
        q, k, v, cache, meta = _batch(query_lens, seq_lens, dtype)
        times = {b.name: [] for b in backends}
        reps = 10 if max(seq_lens) <= 128 else 4
        for _ in range(rounds):
            for b in backends:
                times[b.name].append(_time(lambda b=b: b.forward(q, k, v, cache, meta, HEAD_DIM**-0.5), reps, clock))
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        cells = [f"{med[b.name]:.2f} [{min(times[b.name]) * 1e3:.2f}]" for b in backends]
        print(f"| {case} | " + " | ".join(cells) + f" | {med['gather'] / med['cpu']:.1f}x | {med['torch'] / med['cpu']:.1f}x |")


class _TimedBackend:
    """Wraps an attention backend and adds up the wall time of its calls."""

    def __init__(self, inner):
        self.inner, self.name, self.seconds = inner, inner.name, 0.0

    def forward(self, *args):
        t0 = time.perf_counter()
        out = self.inner.forward(*args)
        self.seconds += time.perf_counter() - t0
        return out


def bench_decode_step(rounds: int, context: int, batch: int, steps: int, backends: dict | None = None) -> None:
    """One engine, prefilled once; then rounds of `steps` decode steps alternate between the
    attention backends (all read the same paged cache), so load changes hit them alike.
    `backends`: {label: backend}, the torch path and the C++ kernel by default; the speed-up
    printed is the last one's over the first one's."""
    from engine import LLM, SamplingParams
    from engine.kernels.cpu_attention import CpuPagedAttentionBackend

    print(f"\n## Decode step of the default model (float32), batch {batch} at ~{context}-token contexts\n")
    print("| attention | step ms: median [min] | attention ms per step | attention share |")
    print("| --- | ---: | ---: | ---: |")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (context,), generator=gen).tolist() for _ in range(batch)]
    total_steps = 2 * rounds * steps
    llm = LLM(dtype="float32", attention_backend="cpu", max_num_batched_tokens=2048, max_num_seqs=batch,
              num_blocks=batch * (-(-(context + total_steps + 8) // 16)) + 8)
    attn_modules = [m for m in llm.engine.model.modules() if hasattr(m, "backend") and hasattr(m.backend, "forward")]
    if backends is None:
        backends = {"torch (index_select gather)": TorchAttentionBackend(), "C++ kernel": CpuPagedAttentionBackend()}
    timed = {label: _TimedBackend(b) for label, b in backends.items()}
    params = SamplingParams(temperature=0, max_tokens=total_steps + 4, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm.engine.add_request(f"r{i}", p, params)
    running = llm.engine.scheduler.running
    while len(running) < batch or any(not r.output_token_ids for r in running):
        llm.engine.step()  # prefill everything first
    results = {name: ([], []) for name in timed}
    for _ in range(rounds):
        for name, backend in timed.items():
            for m in attn_modules:
                m.backend = backend
            for _ in range(steps):
                backend.seconds = 0.0
                t0 = time.perf_counter()
                llm.engine.step()
                results[name][0].append(time.perf_counter() - t0)
                results[name][1].append(backend.seconds)
    for label, (step_times, attn) in results.items():
        med, a = statistics.median(step_times), statistics.median(attn)
        print(f"| {label} | {med * 1e3:.1f} [{min(step_times) * 1e3:.1f}] | {a * 1e3:.1f} | {a / med:.0%} |")
    first, last = list(results)[0], list(results)[-1]
    speedup = statistics.median(results[first][0]) / statistics.median(results[last][0])
    print(f"\nDecode step speed-up, {last} over {first}: {speedup:.2f}x (medians)")


RECOMPUTE_PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "Explain how a bicycle works.",
    "List three prime numbers and explain why", "Once upon a time in a small village,",
    "The best way to learn a language is", "Describe the water cycle in simple terms.",
    "Why is the sky blue? Answer briefly.",
]


def linear_batch_dependence(dtype: torch.dtype) -> str:
    """Fraction of output elements of x[:M] @ W.T that differ (any bit) from the same rows computed
    inside a 64-row batch, for SmolLM2's QKV shape."""
    gen = torch.Generator().manual_seed(0)
    w = (0.05 * torch.randn(960, 576, generator=gen)).to(dtype)
    x = torch.randn(64, 576, generator=gen).to(dtype)
    full = torch.nn.functional.linear(x, w)
    return ", ".join(f"M={m}: {(torch.nn.functional.linear(x[:m], w) != full[:m]).float().mean().item():.0%}"
                     for m in (1, 2, 7, 16, 32))


def attention_path_dependence(dtype: torch.dtype, backend) -> tuple[int, int, float]:
    """Each token of a 75-token sequence attended as a decode and as a row of the prefill, same
    cache: how many tokens' outputs differ, and by how much at most."""
    n, gen = 75, torch.Generator().manual_seed(3)
    q = torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    table = list(range(1, 1 + -(-n // BLOCK)))
    cache = torch.zeros(2, 1 + len(table), BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    full = backend.forward(q, k, v, cache, AttentionMetadata.build([n], [n], [table], BLOCK), HEAD_DIM**-0.5)
    differ, worst = 0, 0.0
    for t in range(n):
        meta = AttentionMetadata.build([1], [t + 1], [table], BLOCK)
        dec = backend.forward(q[t : t + 1], k[t : t + 1], v[t : t + 1], cache, meta, HEAD_DIM**-0.5)[0]
        differ += not torch.equal(dec, full[t])
        worst = max(worst, (dec.float() - full[t].float()).abs().max().item())
    return differ, n, worst


def bench_recompute(dtype: str, new_tokens: int) -> None:
    """Greedy outputs of the default model with and without heavy preemption (recompute),
    for each attention backend: how many sequences match the unpressured run bit for bit
    (tokens and logprobs), and where the first differing token is."""
    from engine import LLM, SamplingParams

    from engine.kernels.cpu_attention import CpuPagedAttentionBackend

    print(f"\n## Does a token's value depend on how it is batched? ({dtype})\n")
    print(f"- linear layer (576 -> 960), rows differing from the 64-row batch: {linear_batch_dependence(getattr(torch, dtype))}")
    for backend in (TorchAttentionBackend(), CpuPagedAttentionBackend()):
        differ, n, worst = attention_path_dependence(getattr(torch, dtype), backend)
        print(f"- attention `{backend.name}`: decode vs prefill row differ for {differ}/{n} tokens, max abs {worst:.3g}")
    print(f"\n## Recompute after preemption, {dtype}, {len(RECOMPUTE_PROMPTS)} greedy requests x {new_tokens} tokens\n")
    print("| attention | preemptions | same tokens | same logprobs | first differing token (request: index) |")
    print("| --- | ---: | ---: | ---: | --- |")
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=0)
    for backend in ("torch", "cpu"):
        runs = {}
        for pressured in (False, True):
            kwargs = dict(num_blocks=12, max_num_batched_tokens=24) if pressured else dict(num_blocks=256)
            llm = LLM(dtype=dtype, attention_backend=backend, enable_prefix_caching=False, **kwargs)
            outs = llm.generate(RECOMPUTE_PROMPTS, params, use_tqdm=False)
            runs[pressured] = ([o.outputs[0].token_ids for o in outs],
                               [o.outputs[0].logprobs for o in outs],
                               llm.engine.scheduler.num_preemptions)
            del llm
            gc.collect()
        (tok0, lp0, _), (tok1, lp1, npre) = runs[False], runs[True]
        same_tok = sum(a == b for a, b in zip(tok0, tok1))
        same_lp = sum(a == b for a, b in zip(lp0, lp1))
        first = [f"{i}: {next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}"
                 for i, (a, b) in enumerate(zip(tok0, tok1)) if a != b]
        print(f"| {backend} | {npre} | {same_tok}/{len(tok0)} | {same_lp}/{len(lp0)} | {', '.join(first) or '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "kernels", "step", "recompute"], default="all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="q/K/V dtype of part 1")
    ap.add_argument("--cpu-time", action="store_true",
                    help="part 1 measures the calling thread's CPU time (use with --threads 1 on a busy machine)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="decode steps timed per round in part 2")
    ap.add_argument("--recompute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--recompute-tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engine.kernels.cpu_extension import cpu_ops_available

    if not cpu_ops_available():
        raise SystemExit("the C++ CPU attention extension could not be built on this machine (see the log)")
    print(f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.part in ("all", "kernels"):
        bench_kernels(args.rounds, getattr(torch, args.dtype), args.cpu_time)
    if args.part in ("all", "step"):
        bench_decode_step(args.rounds, args.context, args.batch, args.steps)
    if args.part == "recompute":  # not in "all": it measures numerics, not speed
        bench_recompute(args.recompute_dtype, args.recompute_tokens)
    print(f"\nLoad average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
