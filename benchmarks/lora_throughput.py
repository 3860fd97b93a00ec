"""Multi-LoRA throughput: one workload spread over 8 adapters vs the same workload on the base model.

    python -m benchmarks.lora_throughput --quick     # tiny random Llama, small workload (~1-2 min)
    python -m benchmarks.lora_throughput             # 56M-parameter random Llama, 2 rounds
    python -m benchmarks.lora_throughput --model default   # the default SmolLM2-135M (GGUF)

Systems, each in its own child process (same dtype, threads, requests; EOS ignored, exact
output lengths, everything submitted at once), alternating inside each round because these
machines drift by 10-15 % from minute to minute:
  * base:         `LLM(model)`, no LoRA at all
  * lora-idle:    `LLM(model, enable_lora=True, max_loras=8)`, every request on the base model
                  (what enabling LoRA costs a deployment that is not using it)
  * lora-8:       the same engine, request i on adapter i % 8 (ranks 8 and 16 alternating,
                  every projection targeted: q/k/v/o/gate/up/down), all in one mixed batch
Adapters are random PEFT adapters written with `peft` (`init_lora_weights=False`, so both A and
B are non-zero) into --out-dir. Goal (issue 15): lora-8 >= 0.8x base output tokens/s.

Also times `add_lora` alone at the model's projection shapes (--kernel-batch tokens over 8
slots): the grouped path (a shrink + expand matmul pair per slot) against the padded bmm path
(two bmm over all slots), per call and as a fraction of the base projection's matmul.

Writes <out-dir>/lora_throughput.json and prints a markdown summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.stats import RunResult, median_summary, summarize_run
from benchmarks.throughput import LLAMA_56M, LLAMA_TINY, machine_info, make_random_llama, run_child_command
from benchmarks.workloads import Workload, fixed_workload

SYSTEMS = ("base", "lora-idle", "lora-8")
NUM_ADAPTERS = 8
RANKS = (8, 16)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(model: str | None):
    """The transformers config of a checkpoint folder, or of the default GGUF (model None)."""
    from transformers import AutoConfig

    if model is None:
        from engine.models.default_model import default_gguf_path

        gguf = default_gguf_path()
        return AutoConfig.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    return AutoConfig.from_pretrained(model)


def make_adapters(model: str | None, out_dir: str, num: int = NUM_ADAPTERS, seed: int = 0) -> list[str]:
    """Writes `num` random PEFT LoRA adapters (rank RANKS[i % 2], alpha 2r) for the model's
    architecture under out_dir (once) and returns their folders. The adapters are made on a
    randomly initialised model of the same config: only module names and shapes matter."""
    paths = [os.path.join(out_dir, f"adapter-{i}-r{RANKS[i % len(RANKS)]}") for i in range(num)]
    if all(os.path.exists(os.path.join(p, "adapter_config.json")) for p in paths):
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(cfg)
        for i, path in enumerate(paths):
            r = RANKS[i % len(RANKS)]
            lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0,
                              init_lora_weights=False, task_type="CAUSAL_LM")
            peft_model = get_peft_model(base, lcfg)
            peft_model.peft_config["default"].base_model_name_or_path = model
            peft_model.save_pretrained(path)
            base = peft_model.unload()  # the bare base model again, for the next adapter
    return paths


def child_run(system: str, model: str | None, workload: Workload, adapters: list[str], threads: int,
              dtype: str, max_num_seqs: int) -> RunResult:
    """One system's run, in this process: warm-up (every adapter loaded and used once), then the
    whole workload in one `generate` call."""
    from engine import LLM, SamplingParams
    from engine.lora.request import LoRARequest

    opts = dict(enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=max(RANKS)) if system != "base" else {}
    llm = LLM(model=model, dtype=dtype, num_threads=threads, max_num_seqs=max_num_seqs, **opts)
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)]
    per_request = [loras[i % len(loras)] if system == "lora-8" else None for i in range(len(workload.requests))]
    warm = [list(workload.requests[0].prompt_ids[:16])] * len(loras)
    warm_params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)
    llm.generate(warm, warm_params, use_tqdm=False, lora_request=loras if system == "lora-8" else None)
    prompts = [list(r.prompt_ids) for r in workload.requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in workload.requests]
    t0, c0 = time.time(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_request)
    wall, cpu = time.time() - t0, time.process_time() - c0
    from benchmarks.stats import RequestRecord

    records = []
    for req, out in zip(workload.requests, outs):
        n = len(out.outputs[0].token_ids)
        err = None if n == req.output_len else f"expected {req.output_len} tokens, got {n}"
        records.append(RequestRecord(len(req.prompt_ids), n, out.metrics.first_token_time - t0,
                                     out.metrics.finished_time - t0, error=err))
    return RunResult(system, workload.name, wall, records, notes={"cpu_s": round(cpu, 3)})


def run_in_child(system: str, args, workload: Workload, adapters: list[str], work_dir: str) -> RunResult:
    wl_path, out_path = os.path.join(work_dir, "workload.json"), os.path.join(work_dir, f"{system}.json")
    with open(wl_path, "w") as f:
        f.write(workload.to_json())
    cmd = [sys.executable, "-m", "benchmarks.lora_throughput", "--child", system, "--child-workload", wl_path,
           "--child-out", out_path, "--child-adapters", json.dumps(adapters), "--threads", str(args.threads),
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
    if args.model_dir:
        cmd += ["--model", args.model_dir]
    return run_child_command(system, cmd, work_dir, out_path)


def time_add_lora(model: str | None, dtype: str, num_tokens: int, threads: int, reps: int = 50) -> list[dict]:
    """add_lora per call at each projection shape of the model (rank 16, 8 slots, tokens spread
    round-robin): grouped path vs padded bmm path, and the base projection's matmul."""
    import torch

    from engine.kernels.lora_mapping import LoRAMapping, lora_mapping
    from engine.kernels.lora_ops import add_lora_torch

    torch.set_num_threads(threads)
    cfg = hf_config(model)
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    shapes = {"q/o": (hidden, cfg.num_attention_heads * head_dim), "k/v": (hidden, cfg.num_key_value_heads * head_dim),
              "gate/up": (hidden, inter), "down": (inter, hidden)}
    dt = getattr(torch, dtype)
    slots = torch.arange(num_tokens) % NUM_ADAPTERS
    padded = lora_mapping(slots, NUM_ADAPTERS)
    grouped = LoRAMapping(padded.token_slots, NUM_ADAPTERS, padded.groups, None)

    def best_us(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) / reps * 1e6)
        return min(times)

    rows = []
    with torch.no_grad():
        for name, (n_in, n_out) in shapes.items():
            x, w = torch.randn(num_tokens, n_in, dtype=dt), torch.randn(n_out, n_in, dtype=dt)
            a, b = torch.randn(NUM_ADAPTERS, 16, n_in, dtype=dt), torch.randn(NUM_ADAPTERS, n_out, 16, dtype=dt)
            y, sc = torch.randn(num_tokens, n_out, dtype=dt), torch.ones(NUM_ADAPTERS)
            base = best_us(lambda: torch.nn.functional.linear(x, w))
            g = best_us(lambda: add_lora_torch(y, x, a, b, grouped, sc))
            p = best_us(lambda: add_lora_torch(y, x, a, b, padded, sc))
            rows.append({"proj": name, "in": n_in, "out": n_out, "tokens": num_tokens, "base_us": round(base, 1),
                         "grouped_us": round(g, 1), "padded_bmm_us": round(p, 1)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint folder, or 'default' for SmolLM2-135M "
                   "(default: a random 56M Llama written under --out-dir)")
    p.add_argument("--quick", action="store_true", help="tiny model, 16 requests, 1 round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kernel-batch", type=int, default=64, help="tokens per add_lora call in the kernel timing")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "out", "lora"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-workload", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-adapters", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model_dir = None if args.model in (None, "default") else args.model

    if args.child:
        with open(args.child_workload) as f:
            workload = Workload.from_json(f.read())
        result = child_run(args.child, args.model_dir, workload, json.loads(args.child_adapters), args.threads,
                           args.dtype, args.max_num_seqs)
        with open(args.child_out, "w") as f:
            json.dump(result.to_dict(), f)
        return 0

    from engine.startup import cpu_has_fast_bf16, default_num_threads

    if args.dtype == "auto":
        args.dtype = "bfloat16" if cpu_has_fast_bf16()[0] else "float32"
    args.threads = args.threads or default_num_threads()
    if args.quick:
        args.rounds, args.num_requests, args.prompt_len, args.output_len = 1, 16, 16, 8
        args.max_num_seqs, args.kernel_batch = 16, 16
    os.makedirs(args.out_dir, exist_ok=True)
    if args.model is None:
        shape, tag = (LLAMA_TINY, "tiny") if args.quick else (LLAMA_56M, "56m")
        args.model_dir = make_random_llama(os.path.abspath(os.path.join(args.out_dir, f"llama-{tag}")), shape)
    model_tag = os.path.basename(args.model_dir) if args.model_dir else "smollm2-135m"
    adapters = make_adapters(args.model_dir, os.path.join(os.path.abspath(args.out_dir), f"adapters-{model_tag}"))
    workload = fixed_workload(args.num_requests, args.prompt_len, args.output_len, seed=0)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"--systems: unknown {sorted(unknown)}; choose from {SYSTEMS}")

    report = {"machine": machine_info(), "command": " ".join(["python -m benchmarks.lora_throughput"] + (argv or sys.argv[1:])),
              "model": model_tag, "dtype": args.dtype, "threads": args.threads, "workload": workload.spec,
              "adapters": {"num": NUM_ADAPTERS, "ranks": list(RANKS), "targets": TARGETS}, "rounds": []}
    print(f"[lora] model {model_tag}, {args.dtype}, {args.threads} threads, load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as work:
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]
            summaries = {}
            for system in order:
                load = os.getloadavg()[0]
                s = summarize_run(run_in_child(system, args, workload, adapters, work))
                s["load_1m"] = round(load, 2)
                summaries[system] = s
                print(f"[round {rnd}] {system:10s} {s['output_tok_s']:8.1f} out tok/s  "
                      f"{s['out_tok_per_cpu_s']:8.1f} per CPU-s  wall {s['wall_s']:6.1f} s  "
                      f"errors {s['errors']}  load {load:.2f}", flush=True)
            report["rounds"].append(summaries)
    report["kernel"] = time_add_lora(args.model_dir, args.dtype, args.kernel_batch, args.threads)
    medians = {s: median_summary([r[s] for r in report["rounds"]]) for s in systems}
    report["median"] = medians
    if "base" in medians:
        report["ratio_vs_base"] = {s: round(m["output_tok_s"] / medians["base"]["output_tok_s"], 3)
                                   for s, m in medians.items()}
        # per CPU-second of the engine process: steadier than wall time on a shared machine
        report["cpu_ratio_vs_base"] = {s: round(m["out_tok_per_cpu_s"] / medians["base"]["out_tok_per_cpu_s"], 3)
                                       for s, m in medians.items()}
    with open(os.path.join(args.out_dir, "lora_throughput.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"Model {report['model']} ({report['dtype']}, {report['threads']} threads), workload "
             f"{report['workload']}, 8 adapters r{'/'.join(map(str, RANKS))}", "",
             "| system | out tok/s per round | median | vs base | out tok per CPU-s per round | median | vs base |",
             "|---|---|---|---|---|---|---|"]
    for s, m in report["median"].items():
        per_round = ", ".join(f"{r[s]['output_tok_s']:.1f}" for r in report["rounds"])
        per_cpu = ", ".join(f"{r[s]['out_tok_per_cpu_s']:.1f}" for r in report["rounds"])
        ratio = report.get("ratio_vs_base", {}).get(s)
        cpu_ratio = report.get("cpu_ratio_vs_base", {}).get(s)
        lines.append(f"| {s} | {per_round} | {m['output_tok_s']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{per_cpu} | {m['out_tok_per_cpu_s']:.1f} | {'' if cpu_ratio is None else f'{cpu_ratio:.2f}x'} |")
    lines += ["", "| proj (in x out) | tokens | base matmul us | add_lora grouped us | add_lora padded-bmm us |",
              "|---|---|---|---|---|"]
    for k in report["kernel"]:
        lines.append(f"| {k['proj']} ({k['in']}x{k['out']}) | {k['tokens']} | {k['base_us']} | {k['grouped_us']} | "
                     f"{k['padded_bmm_us']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
