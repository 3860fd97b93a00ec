"""End-to-end A/B of two checkouts of the engine: a base checkout (a git worktree of an older
commit, the "old" side) against this checkout ("new"), through `LLM.generate` on
benchmarks/throughput.py's "mixed" workload (32 requests, prompts 16-512, outputs 16-128, seed 1)
or its "fixed" one (32 x 128 -> 64), float32 compute, greedy, EOS ignored, linear backend "cpu",
1 thread. First written for SiLU-and-mul in the gate_up GEMM's epilogue; used since for every
engine change that must keep the tokens.

Each run is a fresh process importing `engine` from its side's root, the sides alternating for
`--rounds` rounds. Reports medians of wall and CPU seconds, output tokens per CPU second, the
new/old CPU ratio of each round (median), and whether the generated tokens are identical.

    git worktree add /tmp/wt_base <commit before>
    nice -n 5 python -m benchmarks.checkout_ab --old /tmp/wt_base [--rounds 3] [--workload fixed]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODEL = "benchmarks/out/h14_run2/models/llama-56m"


def child(root: str, model: str, workload: str) -> dict:
    """One run with `engine` imported from `root`: load, warm up, generate; the numbers."""
    from benchmarks.timed_generate import timed_generate  # this checkout's (`benchmarks` runs from it)
    from benchmarks.workloads import fixed_workload, mixed_workload

    sys.path.insert(0, root)
    from engine import LLM

    import engine
    assert engine.__file__.startswith(os.path.abspath(root)), engine.__file__
    wl = mixed_workload(32, (16, 512), (16, 128), 1) if workload == "mixed" else fixed_workload(32, 128, 64, 1)
    llm = LLM(model=model, dtype="float32", linear_backend="cpu", num_threads=1)
    return timed_generate(llm, wl)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="root of the base checkout (a git worktree)")
    ap.add_argument("--model", default=os.path.abspath(MODEL))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workload", choices=["mixed", "fixed"], default="mixed")
    ap.add_argument("--child", metavar="ROOT")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.workload)))
        return
    sides = {"old": os.path.abspath(args.old), "new": os.path.abspath(".")}
    res = {s: [] for s in sides}
    for r in range(args.rounds):
        for s in (("old", "new") if r % 2 == 0 else ("new", "old")):
            out = subprocess.run([sys.executable, "-m", "benchmarks.checkout_ab", "--model", args.model,
                                  "--old", args.old, "--workload", args.workload, "--child", sides[s]], capture_output=True, text=True, check=True)
            res[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(r, s, res[s][-1], flush=True)
    ratio = statistics.median(n["cpu_s"] / o["cpu_s"] for n, o in zip(res["new"], res["old"]))
    print("| side | wall s | CPU s | out tok/CPU-s | tokens |")
    print("| --- | ---: | ---: | ---: | --- |")
    for s, rs in res.items():
        cpu = statistics.median(x["cpu_s"] for x in rs)
        print(f"| {s} | {statistics.median(x['wall_s'] for x in rs):.2f} | {cpu:.2f} | {rs[0]['out_tokens'] / cpu:.0f} | "
              f"{sorted({x['tokens_sha'] for x in rs})} |")
    print(f"new/old CPU time, median of the rounds' ratios: {ratio:.3f}")


if __name__ == "__main__":
    main()
