"""Validates the simulator against the real engine: the same traces through both.

    python -m benchmarks.validate --cost-model benchmarks/out/cost_model.json [--policies fcfs,slo]
    benchmarks/validate_idle.sh          # calibrate, then validate: the whole check, one command

Runs `LLMEngine` (through `benchmarks.calibrate.run_trace_on_engine`, in real time) and the
simulator (same engine settings: blocks, budget, sequences, model length, vocabulary; same trace,
same policy objects) on four workloads: short chat, long-prompt summarization, mixed, and a
bursty (gamma, cv 3) chat trace, under each policy of ``--policies``. It reports the simulator's
relative error on throughput, mean and p90 TTFT, mean TPOT and mean end-to-end latency, both
sides' goodput under ``--ttft-slo`` / ``--tpot-slo``, and two diagnostics that say which side
a miss is on: the cost model's error on the real run's own steps (same shapes, so a wrong
coefficient shows here) and the wall time per loop iteration outside ``engine.step()``.

The ``slo`` policy is built with the same targets and with the cost model's prefill speed
(``1 / per_token_s`` tokens per second), on both sides.

``--rescore REPORT`` re-runs only the simulator side of a stored report with ``--cost-model``
(the traces are regenerated from the same seed; the real figures are the stored ones): how a
cost model change would have scored against real runs already taken, without the engine.

It refuses to run on a visibly loaded machine (`benchmarks.calibrate.machine_is_quiet`: load
average, then a reference matmul timed before and after; a run whose matmul drifted is reported
as invalid). ``--force`` runs anyway and records the verdict in the report.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.calibrate import (add_engine_args, host_info, machine_is_quiet, make_engine, measure_steps,
                                  reference_matmul_s, run_trace_on_engine)
from engine.scheduler.cost_model import CostModel, StepSample
from engine.scheduler.policies import SLOPolicy
from engine.scheduler.simulator import SimConfig, SimResult, Timeline, simulate
from engine.scheduler.traces import TraceRequest, TraceSpec, generate_trace

WORKLOADS = {  # name: (prompt_len, output_len, rate req/s, arrival cv); sized for a small CPU model
    "short-chat": ("lognormal:48:0.6:256", "lognormal:32:0.6:96", 1.0, 1.0),
    "summarization": ("uniform:300:480", "uniform:8:24", 0.3, 1.0),
    "mixed": ("lognormal:96:1.2:480", "lognormal:24:1.0:96", 0.6, 1.0),
    "bursty": ("lognormal:64:1.0:384", "lognormal:32:0.8:128", 0.7, 3.0),
}
METRICS = {"throughput_out_tok_s": lambda s: s["throughput_out_tok_s"], "ttft_mean_s": lambda s: s["ttft_s"]["mean"],
           "ttft_p90_s": lambda s: s["ttft_s"]["p90"], "tpot_mean_s": lambda s: s["tpot_s"]["mean"],
           "e2e_mean_s": lambda s: s["e2e_s"]["mean"]}


def make_policy_for(name: str, args: argparse.Namespace, cost_model: CostModel):
    """``slo`` with this run's targets and the cost model's prefill speed; others by name."""
    if name != "slo":
        return name
    return SLOPolicy(args.ttft_slo, args.tpot_slo, prefill_tokens_per_s=1.0 / max(cost_model.per_token_s, 1e-9))


def validate_one(args: argparse.Namespace, trace: list[TraceRequest], policy: str, cost_model: CostModel) -> dict:
    """One workload under one policy: the real engine, then the simulator with its exact settings."""
    args.policy = policy if policy != "slo" else "fcfs"  # the config's name; the object below rules
    engine = make_engine(args, policy=None if policy != "slo" else make_policy_for(policy, args, cost_model))
    measure_steps(engine, [2], [32], 3, seed=1)  # warm-up, as in calibration
    steps: list[StepSample] = []
    loop: dict = {}
    records = run_trace_on_engine(engine, trace, seed=args.seed, samples=steps, loop=loop)
    real_result = SimResult(policy, records, Timeline(), len(steps), engine.scheduler.num_preemptions, 0.0)
    real = real_result.summary()
    config = sim_config(args, engine.num_blocks, engine.max_model_len, engine.hf_config.vocab_size)
    sim_result = simulate(trace, make_policy_for(policy, args, cost_model), config, cost_model)
    out_engine = {"num_blocks": engine.num_blocks, "max_model_len": engine.max_model_len,
                  "vocab_size": engine.hf_config.vocab_size}
    sim = sim_result.summary()
    out: dict = {}
    for name, get in METRICS.items():
        s, r = get(sim), get(real)
        out[name] = {"sim": s, "real": r, "rel_error": (s - r) / r if r else float("nan")}
    measured = sum(x.seconds for x in steps)
    predicted = sum(cost_model.step_time(x.num_batched_tokens, x.sum_context, x.num_seqs) for x in steps)
    out["goodput"] = {"sim": sim_result.goodput(args.ttft_slo, args.tpot_slo),
                      "real": real_result.goodput(args.ttft_slo, args.tpot_slo)}
    out["diagnostics"] = {
        "steps": {"sim": sim_result.num_steps, "real": len(steps)},
        "cost_model_error_on_real_steps": predicted / measured - 1 if measured else float("nan"),
        "outside_step_ms_per_iteration":
            1e3 * (loop.get("seconds", 0.0) - measured) / max(loop.get("iterations", 1), 1),
        "preemptions": {"sim": sim_result.num_preemptions, "real": real_result.num_preemptions},
    }
    # the real run's steps (new tokens, sum of contexts, sequences, seconds): to refit or re-check later
    out["engine"] = out_engine
    # per request (ttft, tpot): goodput under any other targets, afterwards
    out["real_requests"] = [[round(r.ttft, 4), round(r.tpot, 4)] for r in records]
    out["sim_requests"] = [[round(r.ttft, 4), round(r.tpot, 4)] for r in sim_result.records]
    out["real_steps"] = [[x.num_batched_tokens, x.sum_context, x.num_seqs, round(x.seconds, 6)] for x in steps]
    return out


_SETTINGS = ("num_requests", "rate_scale", "seed", "num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs")


def sim_config(args: argparse.Namespace, num_blocks: int, max_model_len: int, vocab_size: int) -> SimConfig:
    """The engine settings that matter to scheduling, as the simulator takes them."""
    return SimConfig(num_blocks=num_blocks, block_size=args.block_size,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                     max_model_len=max_model_len, vocab_size=vocab_size, seed=args.seed)


def workload_trace(name: str, args: argparse.Namespace) -> list[TraceRequest]:
    prompt_len, output_len, rate, cv = WORKLOADS[name]
    return generate_trace(TraceSpec(num_requests=args.num_requests, rate=rate * args.rate_scale, prompt_len=prompt_len,
                                    output_len=output_len, arrival="gamma" if cv != 1.0 else "poisson",
                                    cv=cv, seed=args.seed))


def rescore(args: argparse.Namespace) -> dict:
    """The simulator side of a stored report again, with ``args.cost_model``; real figures kept."""
    stored = json.loads(Path(args.rescore).read_text())
    for k, v in stored.get("settings", {}).items():  # the stored run's settings win over the flags
        setattr(args, k, v)
    cost_model = CostModel.from_json(args.cost_model) if args.cost_model else CostModel()
    engine = stored.get("engine", {"num_blocks": args.num_blocks, "max_model_len": 8192, "vocab_size": 49152})
    config = sim_config(args, engine["num_blocks"], engine["max_model_len"], engine["vocab_size"])
    report = {"rescored": args.rescore, "cost_model": asdict(cost_model), "results": {}}
    for key, old in stored["results"].items():
        name, policy = key.split("/")
        trace = workload_trace(name, args)
        sim = simulate(trace, make_policy_for(policy, args, cost_model), config, cost_model).summary()
        res = {k: {"sim": get(sim), "real": old[k]["real"], "rel_error": (get(sim) - old[k]["real"]) / old[k]["real"]}
               for k, get in METRICS.items()}
        report["results"][key] = res
        print(f"{name:<14}{policy:<6}" + "".join(f"{k} {res[k]['rel_error']:+.0%}  " for k in METRICS), flush=True)
    return report


def validate(args: argparse.Namespace) -> dict:
    cost_model = CostModel.from_json(args.cost_model) if args.cost_model else CostModel()
    before = reference_matmul_s()
    ok, why = machine_is_quiet(os.getloadavg()[0], os.cpu_count() or 1)
    report = {"host": host_info(), "num_threads": args.num_threads, "cost_model": asdict(cost_model),
              "settings": {k: getattr(args, k) for k in _SETTINGS},
              "matmul_before_s": before, "slo_targets": {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo},
              "results": {}}
    if not ok and not args.force:
        report["refused"] = why
        print(f"refusing to validate: {why}. A fidelity figure taken now would measure the other load, not "
              f"the simulator; rerun when the machine is quiet (or pass --force to mark the figures 'loaded').")
        return report
    report["loaded"] = not ok
    report["load_at_start"] = why
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    for name in workloads:
        trace = workload_trace(name, args)
        for policy in args.policies.split(","):
            res = validate_one(args, trace, policy, cost_model)
            report["engine"] = res.pop("engine")
            report["results"][f"{name}/{policy}"] = res
            print(f"{name:<14}{policy:<6}" + "".join(f"{k} {res[k]['rel_error']:+.0%}  " for k in METRICS)
                  + f"goodput sim {res['goodput']['sim']:.0%} real {res['goodput']['real']:.0%}  "
                  f"cost model on real steps {res['diagnostics']['cost_model_error_on_real_steps']:+.0%}",
                  flush=True)
    report["matmul_after_s"] = after = reference_matmul_s()
    ok_after, why_after = machine_is_quiet(os.getloadavg()[0], os.cpu_count() or 1, before, after)
    if not ok_after:
        report["invalid"] = why_after
        print(f"these figures are not a fidelity measurement: {why_after}")
    errors = [abs(r[k]["rel_error"]) for r in report["results"].values() for k in METRICS]
    report["max_abs_rel_error"] = float(np.nanmax(errors)) if errors else None
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--cost-model", help="the fitted model to check (default: built-in)")
    parser.add_argument("--policies", default="fcfs,slo")
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--num-requests", type=int, default=40, help="requests per workload")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiplies every workload's arrival rate")
    parser.add_argument("--ttft-slo", type=float, default=3.0, help="TTFT target (s) for goodput and slo")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="TPOT target (s) for goodput and slo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run even on a loaded machine (marked 'loaded')")
    parser.add_argument("--report", default="benchmarks/out/validation.json")
    parser.add_argument("--rescore", metavar="REPORT", help="re-simulate a stored report with --cost-model (no engine)")
    args = parser.parse_args(argv)
    report = rescore(args) if args.rescore else validate(args)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
