"""End-to-end A/B of the own GEMM's weight panel storage: float32 panels against exact 16-bit
panels (engine/kernels/cpu_gemm.py picks bfloat16 for a bf16 checkpoint), the whole engine
through `LLM.generate`, float32 compute, greedy, EOS ignored.

Each run is a fresh process (peak RSS is per process), alternating the two storages for
`--rounds` rounds per workload: "fixed" (32 requests, 128 prompt + 64 output tokens), "mixed"
(32 requests, prompts 16-512, outputs 16-128) and "small" (4 requests, 64 prompt + 128 output
tokens: decode steps of 4 rows, where the weight stream dominates). Reports medians of wall and CPU seconds, output
tokens per second, peak RSS, and whether the generated tokens are identical (they must be: the
FMAs see the same float32 weights).

    nice -n 5 python -m benchmarks.panel_storage_ab --model benchmarks/out/h14_run2/models/llama-56m
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

STORAGES = ("float32", "auto")
WORKLOADS = ("fixed", "mixed", "small")


def child(model: str, storage: str, workload: str) -> dict:
    """One run in this process: load, warm up, generate the workload; the numbers as a dict."""
    import torch

    from benchmarks.peers.child import peak_rss_bytes
    from benchmarks.timed_generate import timed_generate
    from benchmarks.workloads import fixed_workload, mixed_workload
    from engine import LLM
    from engine.kernels import cpu_gemm

    if storage == "float32":  # the A side: what pack did before 16-bit panels
        cpu_gemm.STORAGE_DTYPES = (torch.float32,)
    wl = {"fixed": lambda: fixed_workload(32, 128, 64, 0), "small": lambda: fixed_workload(4, 64, 128, 0),
          "mixed": lambda: mixed_workload(32, (16, 512), (16, 128), 0)}[workload]()
    llm = LLM(model=model, dtype="float32", linear_backend="cpu", num_threads=1)
    return {**timed_generate(llm, wl), "peak_rss_mb": peak_rss_bytes() / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/out/h14_run2/models/llama-56m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--child", nargs=2, metavar=("STORAGE", "WORKLOAD"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, *args.child)))
        return
    workloads = args.workloads.split(",")
    res = {(s, w): [] for s in STORAGES for w in workloads}
    for r in range(args.rounds):
        for w in workloads:
            for s in STORAGES[r % 2:] + STORAGES[:r % 2]:
                out = subprocess.run([sys.executable, "-m", "benchmarks.panel_storage_ab", "--model", args.model,
                                      "--child", s, w], capture_output=True, text=True, check=True)
                res[(s, w)].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(r, w, s, res[(s, w)][-1], flush=True)
    print("| workload | panels | wall s | CPU s | out tok/s (wall) | out tok/CPU-s | peak RSS MiB | tokens |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for w in workloads:
        for s in STORAGES:
            rs = res[(s, w)]
            wall, cpu = statistics.median(x["wall_s"] for x in rs), statistics.median(x["cpu_s"] for x in rs)
            n = rs[0]["out_tokens"]
            print(f"| {w} | {s} | {wall:.2f} | {cpu:.2f} | {n / wall:.0f} | {n / cpu:.0f} | "
                  f"{statistics.median(x['peak_rss_mb'] for x in rs):.0f} | {sorted({x['tokens_sha'] for x in rs})} |")


if __name__ == "__main__":
    main()
