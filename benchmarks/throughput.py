"""Offline throughput: Conveyor (continuous and static batching) against its peers, one run.

    python -m benchmarks.throughput --quick          # tiny model and workloads, a few minutes (see --help)
    python -m benchmarks.throughput                  # 56M-parameter random Llama, full workloads
    python -m benchmarks.throughput --systems conveyor,vllm-offline --vllm-python /opt/peers/vllm-venv/bin/python

Every system gets the same model (a random Llama written once under --out-dir, with the
SmolLM2 tokenizer), dtype (by default the host's fastest: see --dtype), thread count and requests (token-id prompts, EOS ignored, exact
output lengths), and all requests are submitted at once. Systems run one after another inside
each round, alternating, because these machines drift by 10-15 % from minute to minute.
Peers that are not installed are skipped with the reason, never faked.

Writes <out-dir>/throughput.json, throughput.md and throughput.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import traceback

from benchmarks import plots
from benchmarks.peers import hf_continuous, llamacpp, vllm_cpu
from benchmarks.stats import RunResult, markdown_table, median_summary, ratio_table, summarize_run
from benchmarks.workloads import Workload, fixed_workload, mixed_workload

ALL_SYSTEMS = ("conveyor", "conveyor-static", "conveyor-blas", "conveyor-onednn", "hf-static", "hf-continuous",
               "llama.cpp-server", "vllm-server", "vllm-offline")
QUICK_SYSTEMS = ("conveyor", "conveyor-static", "hf-static", "hf-continuous", "llama.cpp-server")
IN_PROCESS = ("conveyor", "conveyor-static", "conveyor-blas", "conveyor-onednn", "hf-static", "hf-continuous")

# ~56M parameters: 25M in the (tied) embedding, 3.2M per layer
LLAMA_56M = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64)
LLAMA_TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)

COLUMNS = [("out tok/s", "output_tok_s", 1), ("total tok/s", "total_tok_s", 1), ("TTFT mean s", "ttft_mean", 2),
           ("TTFT p99 s", "ttft_p99", 2), ("peak MiB", "peak_mem_mb", 0), ("wall s", "wall_s", 1),
           ("CPU s", "cpu_s", 1), ("out tok/CPU-s", "out_tok_per_cpu_s", 1), ("errors", "errors", 0)]
# Issue 13's goals: Conveyor / peer, output tokens per second, and the workloads each applies to
GOALS = (("vllm-offline", 1.3, ("fixed", "mixed")), ("llama.cpp-server", 1.3, ("fixed", "mixed")),
         ("hf-static", 4.0, ("mixed",)))


def make_random_llama(path: str, shape: dict, seed: int = 0) -> str:
    """Writes a random bf16 Llama of `shape` plus the SmolLM2 tokenizer to `path` (once)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from engine.models.default_model import default_gguf_path

    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = path + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    gguf = default_gguf_path()
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def machine_info() -> dict:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    import torch

    from engine.startup import cpu_flags, cpu_has_fast_bf16

    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    vector = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "bf16"))
    return {"cpu": sh("lscpu | grep 'Model name' | sed 's/.*: *//'"), "cores": os.cpu_count(),
            "cpu_flags": vector, "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_bf16": onednn_bf16, "fast_bf16": cpu_has_fast_bf16()[1],
            "load_avg": os.getloadavg(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_in_child(system: str, model_dir: str, workload: Workload, args, work_dir: str) -> RunResult:
    wl_path = os.path.join(work_dir, "workload.json")
    out_path = os.path.join(work_dir, f"{system}.json")
    with open(wl_path, "w") as f:
        f.write(workload.to_json())
    opts = {"batch_sizes": args.hf_batch_sizes} if system == "hf-static" else {}
    if system.startswith("conveyor"):
        opts = {"max_num_seqs": args.max_num_seqs}
    cmd = [sys.executable, "-m", "benchmarks.peers.child", system, model_dir, wl_path, out_path,
           "--threads", str(args.threads), "--dtype", args.dtype, "--opts", json.dumps(opts)]
    return run_child_command(system, cmd, work_dir, out_path)


def run_child_command(system: str, cmd: list[str], work_dir: str, out_path: str) -> RunResult:
    """Runs one system's child process (output to <work_dir>/<system>.log) and reads the
    `RunResult` it wrote to out_path; RuntimeError naming the log when the child fails."""
    log_path = os.path.join(work_dir, f"{system}.log")
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{system} exited with code {rc}; log: {log_path}")
    with open(out_path) as f:
        return RunResult.from_dict(json.load(f))


def run_system(system: str, model_dir: str, workload: Workload, args, work_dir: str) -> RunResult:
    if system in IN_PROCESS:
        return run_in_child(system, model_dir, workload, args, work_dir)
    if system == "llama.cpp-server":
        return llamacpp.run(model_dir, workload, args.threads, args.dtype, llamacpp.find_server(args.llama_server),
                            work_dir)
    py = vllm_cpu.find_python(args.vllm_python)
    if system == "vllm-server":
        return vllm_cpu.run_server(model_dir, workload, args.threads, args.dtype, py, work_dir)
    return vllm_cpu.run_offline(model_dir, workload, args.threads, args.dtype, py, work_dir)


def skip_reasons(systems: list[str], args) -> dict[str, str]:
    out = {}
    for s in systems:
        reason = None
        if s == "hf-continuous":
            reason = hf_continuous.available()
        elif s == "llama.cpp-server":
            reason = llamacpp.skip_reason(args.llama_server)
        elif s.startswith("vllm"):
            reason = vllm_cpu.skip_reason(args.vllm_python)
        if reason:
            out[s] = reason
    return out


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(x) for x in text.split(","))
    return a, b


def build_workloads(args) -> list[Workload]:
    """Quick: 16 tiny requests. Full: --num-requests of --fixed-lens, and of lengths drawn from
    --mixed-prompt / --mixed-output (scaled down from the issue's 64x128->128 and 16-1024 / 16-512
    so a full run of all systems fits ~15 minutes on 2 shared cores)."""
    q = args.quick
    n = 16 if q else args.num_requests
    wls = []
    if "fixed" in args.workloads:
        p, o = (32, 32) if q else args.fixed_lens
        wls.append(fixed_workload(n, p, o, args.seed))
    if "mixed" in args.workloads:
        wls.append(mixed_workload(n, (16, 128) if q else args.mixed_prompt, (16, 64) if q else args.mixed_output,
                                  args.seed + 1))
    return wls


def verdict_lines(summaries: list[dict], workload: str = "") -> list[str]:
    """Plain statements: Conveyor vs each peer (per wall-second and per CPU-second), and issue
    13's goals that apply to `workload` (its name's first word: fixed or mixed)."""
    by = {s["system"]: s for s in summaries if not s.get("skipped")}
    lines = []
    if "conveyor" not in by:
        return ["Conveyor did not run."]
    ratios = ratio_table(summaries, "conveyor")
    cpu_ratios = ratio_table(summaries, "conveyor", "out_tok_per_cpu_s")
    for peer, r in ratios.items():
        cpu = f", {cpu_ratios[peer]:.2f}x per CPU-second" if peer in cpu_ratios else ""
        lines.append(f"Conveyor / {peer}: {r:.2f}x output tokens/s{cpu}")
    kind = workload.split(" ")[0]
    for peer, goal, kinds in GOALS:
        if peer in ratios and kind in kinds:
            ok = "meets" if ratios[peer] >= goal else "FALLS SHORT of"
            lines.append(f"Goal (>= {goal}x {peer}): Conveyor {ok} it ({ratios[peer]:.2f}x).")
    for peer in ("vllm-offline", "vllm-server"):
        if peer in by:
            mem = by["conveyor"]["peak_mem_mb"] / by[peer]["peak_mem_mb"]
            ok = "meets" if mem <= 0.5 else "FALLS SHORT of"
            lines.append(f"Goal (peak memory <= 0.5x {peer}): Conveyor {ok} it ({mem:.2f}x).")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model and workloads: 8 short runs, each in a fresh process; took 279 s on a busy "
                        "2-core machine (load 9), most of it process start-up")
    p.add_argument("--systems", default=None, help=f"comma list from {','.join(ALL_SYSTEMS)}")
    p.add_argument("--workloads", default="fixed,mixed")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: a random Llama made under --out-dir)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="every system's dtype; auto: bfloat16 where the CPU has native bf16 kernels, else float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every system (default: Conveyor's default for this host, "
                        "one per physical core less one)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--fixed-lens", type=_pair, default=(128, 64), help="prompt,output of the fixed workload")
    p.add_argument("--mixed-prompt", type=_pair, default=(16, 512), help="lo,hi prompt lengths (mixed)")
    p.add_argument("--mixed-output", type=_pair, default=(16, 128), help="lo,hi output lengths (mixed)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat every system, alternating systems within a round; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-server", default=None)
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--out-dir", default="benchmarks/out")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.dtype == "auto":
        from engine.startup import cpu_has_fast_bf16

        fast, why = cpu_has_fast_bf16()
        args.dtype = "bfloat16" if fast else "float32"
        print(f"[dtype] {args.dtype} for every system (auto: {why})", flush=True)
    if args.threads is None:
        from engine.startup import default_num_threads

        args.threads = default_num_threads()
        print(f"[threads] {args.threads} for every system (one per physical core less one)", flush=True)
    systems = (args.systems.split(",") if args.systems else list(QUICK_SYSTEMS if args.quick else ALL_SYSTEMS))
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        p.error(f"--systems: unknown {bad}; choose from {ALL_SYSTEMS}")
    if args.hf_batch_sizes is None:
        args.hf_batch_sizes = [8, 16] if args.quick else [8, 32]
    os.makedirs(args.out_dir, exist_ok=True)
    name = "llama-tiny" if args.quick else "llama-56m"
    model_dir = args.model or make_random_llama(os.path.join(os.path.abspath(args.out_dir), "models", name),
                                                LLAMA_TINY if args.quick else LLAMA_56M, args.seed)
    model_dir = os.path.abspath(model_dir)
    skipped = skip_reasons(systems, args)
    for s, why in skipped.items():
        print(f"[skip] {s}: {why}", flush=True)
    info = machine_info()
    workloads = build_workloads(args)
    runs: dict[str, dict[str, list[dict]]] = {w.name: {s: [] for s in systems} for w in workloads}
    for rnd in range(args.rounds):
        for wl in workloads:
            for s in systems:
                if s in skipped:
                    continue
                print(f"[round {rnd + 1}] {wl.name}: {s} ...", flush=True)
                work = tempfile.mkdtemp(prefix=f"{s}-", dir=args.out_dir)
                try:
                    res = run_system(s, model_dir, wl, args, work)
                except Exception as e:  # a peer failing must not hide the others' numbers
                    traceback.print_exc()
                    res = RunResult(s, wl.name, skipped=f"failed: {type(e).__name__}: {str(e)[:160]}")
                summ = summarize_run(res)
                summ["notes"] = res.notes
                runs[wl.name][s].append(summ)
                print(f"    {summ['output_tok_s']:.1f} output tok/s, wall {summ['wall_s']:.1f}s, "
                      f"errors {summ['errors']}", flush=True)
    report = {"machine": info, "command": " ".join(["python -m benchmarks.throughput"] + (argv or sys.argv[1:])),
              "model": model_dir, "dtype": args.dtype, "threads": args.threads, "workloads": {}}
    md = [f"Machine: {info['cpu']}, {info['cores']} cores; {info['date']}; load at start {info['load_avg']}",
          f"CPU: flags {' '.join(info['cpu_flags'])}; torch {info['torch']} capability "
          f"{info['torch_cpu_capability']}, oneDNN bf16 {info['onednn_bf16']} ({info['fast_bf16']})",
          f"Command: `{report['command']}`", f"Model: {os.path.basename(model_dir)} ({args.dtype}, "
          f"{args.threads} threads)", ""]
    for wl in workloads:
        summaries = []
        for s in systems:
            if s in skipped:
                summaries.append({"system": s, "skipped": skipped[s]})
            elif runs[wl.name][s]:
                ok = [x for x in runs[wl.name][s] if not x.get("skipped")]
                summaries.append(median_summary(ok) if ok else runs[wl.name][s][0])
        lines = verdict_lines(summaries, wl.name)
        static = ratio_table(summaries, "conveyor").get("conveyor-static")
        if static:
            lines.insert(0, f"Continuous / static batching (same engine): {static:.2f}x output tokens/s")
        report["workloads"][wl.name] = {"spec": wl.spec, "output_tokens": wl.output_tokens,
                                        "prompt_tokens": wl.prompt_tokens, "systems": summaries, "verdict": lines}
        md += [f"### {wl.name}", "", markdown_table(summaries, COLUMNS), ""] + [f"- {x}" for x in lines] + [""]
    report["machine"]["load_avg_end"] = os.getloadavg()
    md.append(f"Load at end: {report['machine']['load_avg_end']}")
    with open(os.path.join(args.out_dir, "throughput.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out_dir, "throughput.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    plots.throughput_bars(report, os.path.join(args.out_dir, "throughput.png"))
    print("\n".join(md))
    print(f"Wrote {', '.join(os.path.join(args.out_dir, f) for f in ('throughput.md', 'throughput.json', 'throughput.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
