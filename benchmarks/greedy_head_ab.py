"""The greedy LM head (engine/models/greedy_head.py) against the full float32 head, one process.

Head level: the final hidden states a model produced for real prompts (SmolLM2-135M, the
default model) or random-token prompts (the random 56M Llama the peer benchmark uses, if
benchmarks/out/h14_run2/models/llama-56m exists) are fed to the full head and to the screened
head's two implementations of the per-call work (plain torch, and the C++ ops of
engine/kernels/csrc/greedy_screen.cpp, when they are available) at 1, 8, 16, 32 and 64 rows, the
order rotating each round, `--rounds` rounds; CPU time (time.process_time) per call, median over
rounds. All answer argmax(hidden @ W^T); the screened ones are checked to agree. The candidate
counts (how many tokens a row recomputes in float32) and the fallback fraction decide whether
screening pays: they are printed over all collected rows.

End to end (`--e2e`): `LLM.generate`, greedy, 32 requests of 128 prompt tokens -> 64 new
tokens, screening off / on (torch path) / on (C++ ops), the order rotating, `--rounds` rounds
after one untimed run of each, wall and CPU seconds.

Our int8 GEMM (engine/kernels/csrc/int8_gemm.cpp) against fbgemm's inside the C++ path: the
head-level table's "C++, fbgemm" and "C++, own GEMM" columns; `--gemm` times the two GEMMs alone
(the same codes, normalised random rows) at 1, 8, 16, 32 rows.

Old vs new code (`--ab OLD NEW`, two git worktrees): `LLM.generate` on the throughput benchmark's
"fixed" (32 x 128 -> 64) and "mixed" (32 requests, prompts 16-512, outputs 16-128, seed 1)
workloads, each run a fresh process importing one worktree, alternating, `--rounds` rounds.

    nice python -m benchmarks.greedy_head_ab --rounds 3 [--e2e] [--gemm] [--ab OLD NEW --model DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.cpu_attention import machine
from engine import LLM, SamplingParams
from engine.kernels import int8_linear

RANDOM_56M = "benchmarks/out/h14_run2/models/llama-56m"
ROWS = (1, 8, 16, 32, 64)
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than scribes. Within fifty years presses operated in more than two "
    "hundred European cities, and the price of books fell sharply. Scholars argue about how much "
    "the press changed religion, science and politics, but few doubt that cheap printed pamphlets "
    "helped ideas travel. Today we face a similar shift: language models write, translate and "
    "summarise text, and engineers must decide how to run them cheaply on ordinary computers. A "
    "central processing unit has a handful of cores, each with vector units that multiply many "
    "numbers at once; memory bandwidth, cache sizes and the width of those vector units decide how "
    "fast a matrix multiplication can run. Questions people ask a small assistant: What is the "
    "capital of France? How do I bake bread at home? Explain photosynthesis to a child. Write a "
    "short poem about the sea. List three prime numbers and explain why they are prime."
)


def _prompts(llm: LLM, real: bool, n: int, length: int) -> list[list[int]]:
    if real:
        ids = llm.get_tokenizer().encode(TEXT)
        return [(ids * 2)[5 * i:5 * i + length] for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1000, (length,), generator=gen).tolist() for _ in range(n)]


def collect_hidden(llm: LLM, real: bool) -> torch.Tensor:
    """The rows the LM head saw while generating greedily (screening off while collecting)."""
    model = llm.engine.model
    head, model.greedy_head = model.greedy_head, None
    seen, compute = [], model.compute_logits
    model.compute_logits = lambda h: seen.append(h.detach().clone()) or compute(h)
    try:
        llm.generate(_prompts(llm, real, 12, 48), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                     use_tqdm=False)
    finally:
        del model.compute_logits
        model.greedy_head = head
    return torch.cat(seen)


def _cpu_ms(fn, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps * 1e3


def head_level(name: str, llm: LLM, real: bool, rounds: int) -> None:
    head = llm.engine.model.greedy_head
    if head is None:
        print(f"{name}: no greedy head on this machine/model")
        return
    hidden = collect_hidden(llm, real)
    fused = head.fused
    head.fused = False
    res = head.screen(hidden)
    head.fused = fused
    if fused:
        assert torch.equal(head.screen(hidden).tokens, res.tokens), "the C++ and torch paths disagree"
    want = head.full_logits(hidden).argmax(dim=1)
    c = res.candidates.double()
    print(f"\n{name}: {hidden.shape[0]} rows, vocab {head.int8.out_features} x hidden {head.int8.in_features}; "
          f"mismatches {int((res.tokens != want).sum())}; candidates per row mean {c.mean():.1f} median "
          f"{c.median():.0f} p90 {c.quantile(0.9):.0f} max {c.max():.0f}; fallback rows "
          f"{res.fallback.double().mean():.0%}")
    arms = {"full": None, "torch": False, "fused": True} if fused else {"full": None, "torch": False}
    own_panels = head.panels
    if own_panels is not None:
        arms["own"] = True
    print("| rows | full fp32 head ms | screened, torch path ms | screened, C++ (fbgemm) ms | C++, own GEMM ms | "
          "speedup vs full | C++ vs torch | own vs fbgemm | mean candidates | fallback |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in ROWS:
        x = hidden[torch.arange(rows) * 7 % hidden.shape[0]]
        reps = max(3, 64 // rows)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        names = list(arms)
        for r in range(rounds):
            for arm in names[r % len(names):] + names[:r % len(names)]:  # rotate who runs first
                head.fused = bool(arms[arm])
                head.panels = own_panels if arm == "own" else None
                fn = (lambda: head.full_logits(x).argmax(dim=1)) if arm == "full" else (lambda: head.screen(x))
                fn()  # warm (oneDNN primitive for this row count)
                times[arm].append(_cpu_ms(fn, reps))
        head.fused, head.panels = fused, own_panels
        s = head.screen(x)
        med = {arm: statistics.median(v) for arm, v in times.items()}
        best = min(med.get("fused", med["torch"]), med.get("own", float("inf")))
        fused_ms = f"{med['fused']:.2f}" if fused else "-"
        ratio = f"{med['torch'] / med['fused']:.2f}x" if fused else "-"
        own_ms, own_ratio = (f"{med['own']:.2f}", f"{med['fused'] / med['own']:.3f}x") if "own" in med else ("-", "-")
        print(f"| {rows} | {med['full']:.2f} | {med['torch']:.2f} | {fused_ms} | {own_ms} | {med['full'] / best:.2f}x | "
              f"{ratio} | {own_ratio} | {s.candidates.double().mean():.0f} | {s.fallback.double().mean():.0%} |")


def gemm_level(name: str, llm: LLM, rounds: int) -> None:
    """fbgemm's linear_dynamic vs int8_linear.run_panels on the head's codes, CPU ms per call."""
    head = llm.engine.model.greedy_head
    if head is None or head.panels is None:
        print(f"{name}: our int8 GEMM is not available here")
        return
    w, k = head.int8, head.int8.in_features
    print(f"\n{name}: int8 GEMM alone, vocab {w.out_features} x hidden {k}, CPU ms per call (median of "
          f"{rounds} interleaved rounds), GMAC/s")
    print("| rows | fbgemm ms | own ms | fbgemm GMAC/s | own GMAC/s | own vs fbgemm |")
    print("|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 8, 16, 32):
        xn, _ = int8_linear.normalise_rows(torch.randn(rows, k, generator=gen))
        inp = torch.zeros(rows + 1, k)
        inp[:rows], inp[rows, 0], inp[rows, 1] = xn, 1.0, -1.0  # fbgemm's sentinel row, as the head's
        arms = {"fbgemm": lambda: torch.ops.quantized.linear_dynamic(inp, w.packed, True),
                "own": lambda: int8_linear.run_panels(inp, rows, head.panels)}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        reps = max(5, 64 // rows)
        for r in range(rounds):
            for arm in (["fbgemm", "own"] if r % 2 == 0 else ["own", "fbgemm"]):
                arms[arm]()
                times[arm].append(_cpu_ms(arms[arm], reps))
        fb, own = statistics.median(times["fbgemm"]), statistics.median(times["own"])
        macs = rows * w.out_features * k / 1e6
        print(f"| {rows} | {fb:.3f} | {own:.3f} | {macs / fb:.0f} | {macs / own:.0f} | {fb / own:.3f}x |")


def end_to_end(name: str, llm: LLM, real: bool, rounds: int) -> None:
    """Screening off, on through the torch path, on through the C++ ops (when available)."""
    model = llm.engine.model
    head = model.greedy_head
    if head is None:
        return
    prompts = _prompts(llm, real, 32, 128)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    fused = head.fused
    kinds = ["off", "torch", "fused"] if fused else ["off", "torch"]
    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    tokens = {}

    def use(kind: str) -> None:
        model.greedy_head = None if kind == "off" else head
        head.fused = kind == "fused"

    for kind in kinds:  # warm: the first 2,048-token prefill alone costs seconds (oneDNN, allocator)
        use(kind)
        llm.generate(prompts, params, use_tqdm=False)
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            use(kind)
            wall, cpu = time.perf_counter(), time.process_time()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times[kind].append((time.perf_counter() - wall, time.process_time() - cpu))
            tokens[kind] = [o.outputs[0].token_ids for o in outs]
    model.greedy_head, head.fused = head, fused
    same = all(tokens[kind] == tokens["off"] for kind in kinds)
    print(f"\n{name} end to end, 32 x (128 -> 64) greedy, wall / CPU s per round; outputs identical: {same}")
    for kind in kinds:
        print(f"  screening {kind}: " + ", ".join(f"{w:.2f} / {c:.2f}" for w, c in times[kind]))
    off = statistics.median(c for _, c in times["off"])
    for kind in kinds[1:]:
        print(f"  CPU time {kind}/off: {statistics.median(c for _, c in times[kind]) / off:.3f}")


AB_CHILD = """
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.workloads import fixed_workload, mixed_workload
from engine import LLM, SamplingParams
wl = (fixed_workload(32, 128, 64, 0) if sys.argv[3] == "fixed" else mixed_workload(32, (16, 512), (16, 128), 1))
llm = LLM(model=sys.argv[2], num_threads=1)
head = llm.engine.model.greedy_head
prompts = [list(r.prompt_ids) for r in wl.requests]
params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in wl.requests]
llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), use_tqdm=False)
t0, c0 = time.perf_counter(), time.process_time()
outs = llm.generate(prompts, params, use_tqdm=False)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
tokens = [list(o.outputs[0].token_ids) for o in outs]
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "out_tokens": sum(map(len, tokens)),
                  "head": "none" if head is None else ("own" if getattr(head, "panels", None) is not None else "fbgemm"),
                  "sha": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]}))
"""


def old_new(old: str, new: str, model: str, rounds: int) -> None:
    """Fresh processes, old / new worktree alternating (who goes first alternates per round)."""
    import json
    import subprocess
    import sys
    sides = {"old": old, "new": new}
    res: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for wl in ("mixed", "fixed"):
            for side in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
                out = subprocess.run([sys.executable, "-c", AB_CHILD, sides[side], model, wl], cwd=sides[side],
                                     capture_output=True, text=True, check=True)
                res.setdefault((wl, side), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(r, wl, side, res[(wl, side)][-1], flush=True)
    def per_round(rs: list[dict]) -> str:
        return ", ".join(f"{x['cpu_s']:.2f}" for x in rs)

    print("| workload | side | head | wall s (median) | CPU s (median) | CPU s per round | new/old CPU | tokens |")
    print("|---|---|---|---:|---:|---|---:|---|")
    for wl in ("mixed", "fixed"):
        old_cpu = statistics.median(x["cpu_s"] for x in res[(wl, "old")])
        for side in ("old", "new"):
            rs = res[(wl, side)]
            cpu = statistics.median(x["cpu_s"] for x in rs)
            print(f"| {wl} | {side} | {rs[0]['head']} | {statistics.median(x['wall_s'] for x in rs):.2f} | {cpu:.2f} | "
                  f"{per_round(rs)} | {cpu / old_cpu:.3f} | "
                  f"{sorted({x['sha'] for x in rs})} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--e2e", action="store_true", help="also LLM.generate with screening on and off")
    ap.add_argument("--gemm", action="store_true", help="only the int8 GEMMs alone (fbgemm vs ours)")
    ap.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"), help="end to end, two worktrees, fresh processes")
    ap.add_argument("--model", default=RANDOM_56M, help="with --ab: the checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.ab:
        old_new(*args.ab, os.path.abspath(args.model), args.rounds)
        return
    cases = [("SmolLM2-135M (default model, real text)", None, True)]
    if os.path.isdir(RANDOM_56M):
        cases.append(("random 56M Llama (random-token prompts)", RANDOM_56M, False))
    for name, path, real in cases:
        llm = LLM(path, dtype="float32", num_threads=args.threads)
        if args.gemm:
            gemm_level(name, llm, args.rounds)
            continue
        head_level(name, llm, real, args.rounds)
        if args.e2e:
            end_to_end(name, llm, real, args.rounds)
        del llm


if __name__ == "__main__":
    main()
