"""Does `slo` beat `fcfs` on goodput? One bursty trace, on the real engine and in the simulator.

    python -m benchmarks.slo_vs_fcfs --cost-model benchmarks/out/cost_model.json --pairs 3
    python -m benchmarks.slo_vs_fcfs --sim-only      # the simulator's prediction alone, in seconds

The trace (fixed, from ``--seed``): ``--num-requests`` requests with gamma arrivals (CV 3:
bursts) at ``--rate`` requests/s, prompts lognormal with median 64 tokens (sigma 1, at most
384) and outputs lognormal with median 32 (sigma 0.8, at most 128): `benchmarks.validate`'s
bursty chat lengths. The engine: SmolLM2-135M (the default model) with ``--max-num-seqs 8``, so
a burst fills the seats and a queue forms, and admission order decides who waits; with 32
seats every request is admitted at once and no order has anything to choose (the simulator
gives `slo` +23 goodput points at 8 seats and +3 at 32, mean of 16 seeds; docs/scheduling.md).

The targets are fixed before measuring, from the engine's unloaded speed on the 2-core CPU of
benchmarks/RESULTS.md: TTFT <= 2 s (a median 64-token prompt's prefill takes ~0.3 s alone, the
longest 384-token one ~1.3 s) and TPOT <= 0.3 s (a decode step of 4-8 sequences takes
0.09-0.11 s alone, a step with a 64-token prefill ~0.3 s).

Each of ``--pairs`` pairs runs both policies on the real engine (`validate.validate_one`: the
same engine settings and policy objects as the simulator; a fresh engine per run), alternating
the order (fcfs, slo, then slo, fcfs, ...), so a steady drift in the machine's speed cancels.
Before each run it records the 1-minute load average and a reference matmul time (another
process may share the machine). It prints, per run, goodput, mean and p90 TTFT, mean TPOT, and
the share of requests meeting each target, beside the simulator's figures at that run's speed
(the cost model scaled by how much slower the run's steps were than it predicts for the same
shapes: a shared machine's speed moves), then the simulator's prediction for the same trace, and
writes everything (with every request's TTFT and TPOT) to ``--report``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from benchmarks.calibrate import add_engine_args, host_info, reference_matmul_s
from benchmarks.validate import make_policy_for, sim_config, validate_one
from engine.scheduler.cost_model import CostModel
from engine.scheduler.simulator import simulate
from engine.scheduler.traces import TraceRequest, TraceSpec, generate_trace

POLICIES = ("fcfs", "slo")


def bursty_trace(args: argparse.Namespace) -> list[TraceRequest]:
    return generate_trace(TraceSpec(num_requests=args.num_requests, rate=args.rate, arrival="gamma", cv=args.cv,
                                    prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed))


def figures(requests: list[list[float]], ttft_slo: float, tpot_slo: float) -> dict:
    """Goodput, TTFT mean / p90, TPOT mean and the shares meeting each target, from per-request
    (TTFT, TPOT) pairs (TPOT is nan for one-token requests: they meet any TPOT target)."""
    import numpy as np

    ttft, tpot = np.array([r[0] for r in requests]), np.array([r[1] for r in requests])
    ttft_ok, tpot_ok = ttft <= ttft_slo, np.isnan(tpot) | (tpot <= tpot_slo)
    return {"goodput": float(np.mean(ttft_ok & tpot_ok)), "ttft_mean_s": float(ttft.mean()),
            "ttft_p90_s": float(np.percentile(ttft, 90)), "tpot_mean_s": float(np.nanmean(tpot)),
            "ttft_met": float(ttft_ok.mean()), "tpot_met": float(tpot_ok.mean())}


def predict(args: argparse.Namespace, trace: list[TraceRequest], cost_model: CostModel,
            num_blocks: int, max_model_len: int = 8192, vocab_size: int = 49152,
            policy_cost_model: CostModel | None = None) -> dict:
    """The simulator's figures per policy for this trace and engine settings; `slo` estimates
    prefill with ``policy_cost_model`` (default: ``cost_model``), as the real run's did."""
    config = sim_config(args, num_blocks, max_model_len, vocab_size)
    out = {}
    for policy in POLICIES:
        result = simulate(trace, make_policy_for(policy, args, policy_cost_model or cost_model), config, cost_model)
        out[policy] = figures([[r.ttft, r.tpot] for r in result.records], args.ttft_slo, args.tpot_slo)
    return out


def line(label: str, f: dict) -> str:
    return (f"{label:<34}{f['goodput']:>8.1%}{f['ttft_mean_s']:>9.2f}{f['ttft_p90_s']:>9.2f}{f['tpot_mean_s']:>9.3f}"
            f"{f['ttft_met']:>9.0%}{f['tpot_met']:>9.0%}")


def run(args: argparse.Namespace) -> dict:
    cost_model = CostModel.from_json(args.cost_model) if args.cost_model else CostModel()
    trace = bursty_trace(args)
    report: dict = {"host": host_info(), "cost_model": asdict(cost_model), "settings": vars(args).copy(), "runs": []}
    print(f"{'':<34}{'goodput':>8}{'TTFT':>9}{'p90':>9}{'TPOT':>9}{'TTFT ok':>9}{'TPOT ok':>9}")
    for pair in range(args.pairs if not args.sim_only else 0):
        for policy in POLICIES if pair % 2 == 0 else POLICIES[::-1]:
            load, matmul = os.getloadavg()[0], reference_matmul_s()
            res = validate_one(args, trace, policy, cost_model)
            real = figures(res["real_requests"], args.ttft_slo, args.tpot_slo)
            report["engine"] = res["engine"]
            # the machine's speed in this run: its steps' time over the cost model's for the same shapes
            slower = 1 + res["diagnostics"]["cost_model_error_on_real_steps"]
            slower = 1 / slower if slower > 0 else float("nan")
            at_speed = predict(args, trace, cost_model.scaled(slower), **res["engine"],
                               policy_cost_model=cost_model)[policy]
            report["runs"].append({"pair": pair, "policy": policy, "load_1m_before": load,
                                   "matmul_ms_before": 1e3 * matmul, "steps_slower_than_cost_model": slower,
                                   "real": real, "sim_at_this_speed": at_speed,
                                   "real_requests": res["real_requests"], "real_steps": len(res["real_steps"])})
            print(line(f"pair {pair} {policy:<5} load {load:.2f} steps x{slower:.2f}", real), flush=True)
            print(line(f"  simulator at that speed", at_speed), flush=True)
    engine = report.get("engine", {"num_blocks": args.num_blocks, "max_model_len": 8192, "vocab_size": 49152})
    report["simulator"] = predict(args, trace, cost_model, engine["num_blocks"], engine["max_model_len"],
                                  engine["vocab_size"])
    for policy, f in report["simulator"].items():
        print(line(f"simulator {policy}", f))
    diffs = [b["real"]["goodput"] - a["real"]["goodput"] for a, b in
             (sorted(report["runs"][i:i + 2], key=lambda r: r["policy"]) for i in range(0, len(report["runs"]), 2))]
    report["slo_minus_fcfs_goodput_per_pair"] = diffs
    sim = report["simulator"]
    print(f"slo - fcfs goodput: simulator {sim['slo']['goodput'] - sim['fcfs']['goodput']:+.1%}"
          + (f"; real pairs {', '.join(f'{d:+.1%}' for d in diffs)}" if diffs else ""))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.set_defaults(max_num_seqs=8)
    parser.add_argument("--cost-model", help="calibrated for this host (benchmarks.calibrate); default: built-in")
    parser.add_argument("--pairs", type=int, default=3, help="real-engine pairs (fcfs, slo), order alternating")
    parser.add_argument("--sim-only", action="store_true", help="only the simulator's prediction (no engine)")
    parser.add_argument("--num-requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=1.2, help="mean arrival rate, requests/s")
    parser.add_argument("--cv", type=float, default=3.0, help="arrival burstiness (gamma; 1 is Poisson)")
    parser.add_argument("--prompt-len", default="lognormal:64:1.0:384")
    parser.add_argument("--output-len", default="lognormal:32:0.8:128")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT target (s), for goodput and slo")
    parser.add_argument("--tpot-slo", type=float, default=0.3, help="TPOT target (s), for goodput and slo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default="benchmarks/out/slo_vs_fcfs.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = run(args)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
