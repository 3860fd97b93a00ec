"""Defaults sweep: block size, max_num_batched_tokens and max_num_seqs, side by side in one run.

    python -m benchmarks.sweep_defaults                    # default model, 144 mixed requests, 2 rounds
    python -m benchmarks.sweep_defaults --model benchmarks/out/models/llama-56m   # throughput.py's model

One factor at a time around the engine's current defaults (`EngineConfig`): every block size of
--block-sizes with the other two at their defaults, and likewise for --batched-tokens and
--max-seqs, so 4 + 4 + 3 values give 9 distinct configurations. Each configuration generates the
same mixed workload (token-id prompts, EOS ignored, exact output lengths, all submitted at once)
in a fresh process with the engine's default KV budget; configurations alternate within a
round, because a shared machine drifts from minute to minute, and every run records the load
average it ran under. The figure compared is output tokens per CPU-second of the engine process
(over the generate call): with the host's one thread it does not depend on how many other jobs
share the cores, while tokens per wall-second (also reported) does. A configuration's ratio to
the default is taken per round (neighbouring runs).

Writes <out-dir>/sweep_defaults.json and sweep_defaults.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.stats import RunResult, summarize_run
from benchmarks.throughput import machine_info
from benchmarks.workloads import mixed_workload


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def configurations(block_sizes: list[int], batched: list[int], seqs: list[int]) -> list[dict]:
    """The default first, then one factor varied at a time; duplicates of the default dropped."""
    from engine.config import EngineConfig

    d = EngineConfig()
    base = {"block_size": d.block_size, "max_num_batched_tokens": d.max_num_batched_tokens,
            "max_num_seqs": d.max_num_seqs}
    out = [base]
    for key, values in (("block_size", block_sizes), ("max_num_batched_tokens", batched), ("max_num_seqs", seqs)):
        for v in values:
            cfg = dict(base, **{key: v})
            if cfg not in out:
                out.append(cfg)
    return out


def label(cfg: dict) -> str:
    return f"bs {cfg['block_size']} / mbt {cfg['max_num_batched_tokens']} / seqs {cfg['max_num_seqs']}"


def run_one(cfg: dict, model: str, wl_path: str, threads: int, dtype: str, work: str) -> dict:
    out_path = os.path.join(work, "result.json")
    opts = dict(cfg, sized_kv=False)
    cmd = [sys.executable, "-m", "benchmarks.peers.child", "conveyor", model, wl_path, out_path,
           "--threads", str(threads), "--dtype", dtype, "--opts", json.dumps(opts)]
    load = os.getloadavg()[0]
    with open(os.path.join(work, "log.txt"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {"failed": f"exit {rc}, log {work}/log.txt", "load_start": load}
    with open(out_path) as f:
        res = RunResult.from_dict(json.load(f))
    summ = summarize_run(res)
    summ["cpu_s"] = res.notes["cpu_s"]
    summ["out_tok_per_cpu_s"] = sum(r.output_len for r in res.records) / res.notes["cpu_s"]
    summ["load_start"], summ["load_end"] = load, os.getloadavg()[0]
    return summ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint dir, or 'default' (the engine's default model)")
    p.add_argument("--block-sizes", type=_ints, default=[16, 32, 64, 128])
    p.add_argument("--batched-tokens", type=_ints, default=[512, 1024, 2048, 4096])
    p.add_argument("--max-seqs", type=_ints, default=[64, 128, 256])
    p.add_argument("--num-requests", type=int, default=144, help="above 128, so every --max-seqs value differs")
    p.add_argument("--mixed-prompt", type=_ints, default=[8, 64])
    p.add_argument("--mixed-output", type=_ints, default=[8, 32])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="default: the engine's host default")
    p.add_argument("--dtype", default="auto", help="auto: what the engine picks for this host")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="benchmarks/out/sweep")
    args = p.parse_args(argv)
    from engine.startup import cpu_has_fast_bf16, default_num_threads

    if args.dtype == "auto":
        args.dtype = "bfloat16" if cpu_has_fast_bf16()[0] else "float32"
    threads = args.threads or default_num_threads()
    model = args.model if args.model == "default" else os.path.abspath(args.model)
    os.makedirs(args.out_dir, exist_ok=True)
    wl = mixed_workload(args.num_requests, tuple(args.mixed_prompt), tuple(args.mixed_output), args.seed)
    wl_path = os.path.join(args.out_dir, "workload.json")
    with open(wl_path, "w") as f:
        f.write(wl.to_json())
    cfgs = configurations(args.block_sizes, args.batched_tokens, args.max_seqs)
    info = machine_info()
    runs: list[list[dict]] = [[] for _ in cfgs]
    for rnd in range(args.rounds):
        for i, cfg in enumerate(cfgs):
            work = tempfile.mkdtemp(prefix="sweep-", dir=args.out_dir)
            r = run_one(cfg, model, wl_path, threads, args.dtype, work)
            runs[i].append(r)
            print(f"[round {rnd + 1}] {label(cfg)}: " + (r["failed"] if "failed" in r else
                  f"{r['out_tok_per_cpu_s']:.1f} out tok per CPU-s, {r['output_tok_s']:.1f} out tok/s, "
                  f"wall {r['wall_s']:.1f}s, CPU {r['cpu_s']:.1f}s, load {r['load_start']:.1f}"), flush=True)
    rows = []
    for i, cfg in enumerate(cfgs):
        ok = [r for r in runs[i] if "failed" not in r]
        per_round = [r["out_tok_per_cpu_s"] / b["out_tok_per_cpu_s"] for r, b in zip(runs[i], runs[0])
                     if "failed" not in r and "failed" not in b]
        rows.append({"config": cfg, "rounds_out_tok_per_cpu_s": [r.get("out_tok_per_cpu_s") for r in runs[i]],
                     "median_out_tok_per_cpu_s": statistics.median(r["out_tok_per_cpu_s"] for r in ok) if ok else None,
                     "rounds_out_tok_s": [r.get("output_tok_s") for r in runs[i]],
                     "median_out_tok_s": statistics.median(r["output_tok_s"] for r in ok) if ok else None,
                     "median_total_tok_s": statistics.median(r["total_tok_s"] for r in ok) if ok else None,
                     "ratio_to_default_per_round": per_round,
                     "peak_mib": max((r["peak_mem_mb"] for r in ok), default=None),
                     "load": [r.get("load_start") for r in runs[i]]})
    info["load_avg_end"] = os.getloadavg()
    report = {"machine": info, "model": args.model, "dtype": args.dtype, "threads": threads,
              "workload": wl.spec, "prompt_tokens": wl.prompt_tokens, "output_tokens": wl.output_tokens,
              "command": " ".join(["python -m benchmarks.sweep_defaults"] + (argv or sys.argv[1:])), "rows": rows}
    md = [f"Machine: {info['cpu']}, {info['cores']} cores; {info['date']}; flags {' '.join(info['cpu_flags'])}; "
          f"torch {info['torch']} capability {info['torch_cpu_capability']}",
          f"Model {args.model}, {args.dtype}, {threads} threads; {wl.name}: {wl.prompt_tokens} prompt / "
          f"{wl.output_tokens} output tokens; load {info['load_avg']} at start, {info['load_avg_end']} at end",
          f"Command: `{report['command']}`", "",
          "Throughput per CPU-second of the engine process (1 thread: load-independent), then per wall-second.", "",
          "| block size | max batched tokens | max seqs | out tok per CPU-s, per round | median | vs default per round "
          "| out tok/s (wall) per round | peak MiB | load per run |",
          "| ---: | ---: | ---: | --- | ---: | --- | --- | ---: | --- |"]
    for r in rows:
        c = r["config"]
        per = " / ".join("-" if x is None else f"{x:.1f}" for x in r["rounds_out_tok_per_cpu_s"])
        wall = " / ".join("-" if x is None else f"{x:.1f}" for x in r["rounds_out_tok_s"])
        rat = " / ".join(f"{x:.2f}x" for x in r["ratio_to_default_per_round"])
        med = "-" if r["median_out_tok_per_cpu_s"] is None else f"{r['median_out_tok_per_cpu_s']:.1f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        load = " / ".join("-" if x is None else f"{x:.1f}" for x in r["load"])
        md.append(f"| {c['block_size']} | {c['max_num_batched_tokens']} | {c['max_num_seqs']} | {per} | {med} | "
                  f"{rat} | {wall} | {peak} | {load} |")
    with open(os.path.join(args.out_dir, "sweep_defaults.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out_dir, "sweep_defaults.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
