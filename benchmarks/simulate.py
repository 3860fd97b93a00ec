"""Compares scheduling policies on one trace with the simulator (no model runs).

    python -m benchmarks.simulate --policies fcfs,sjf,fair,slo --num-requests 10000 --rate 3 \
        --tenants a:0.8,b:0.2 --ttft-slo 2 --tpot-slo 0.1 [--lengths sharegpt] \
        [--cost-model benchmarks/out/cost_model.json] [--trace FILE]

Prints one row per policy with goodput (the share of requests meeting both ``--ttft-slo`` and
``--tpot-slo``), then per tenant (TTFT and TPOT p50/p90/p99, Jain's fairness index over tokens
served) and per priority class (with the share that met ``--ttft-targets``); writes
``simulate_summary.json`` and ``simulate.png`` to ``--out-dir``. ``--trace`` reads a JSON-lines
trace, e.g. one written by ``conveyor serve --trace-file``. The ``slo`` policy is built with
the ``--ttft-slo`` / ``--tpot-slo`` given here and the cost model's prefill speed. ``--validate``
replays the trace on the real engine under the first policy (refused on a loaded machine); the
full check is ``benchmarks/validate.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.calibrate import add_engine_args
from engine.scheduler.cost_model import load_cost_model
from engine.scheduler.simulator import SimConfig, SimResult, Timeline, percentiles, simulate
from engine.scheduler.policies import SLOPolicy
from engine.scheduler.traces import LENGTH_PRESETS, TraceSpec, generate_trace, load_trace, save_trace


def parse_shares(text: str | None, field_name: str, key_type=str) -> dict:
    """``"a:0.8,b:0.2"`` -> ``{"a": 0.8, "b": 0.2}``."""
    if not text:
        return {}
    shares = {}
    for part in text.split(","):
        key, sep, weight = part.rpartition(":")
        try:
            shares[key_type(key)] = float(weight)
        except ValueError:
            raise ValueError(f"{field_name} must look like NAME:SHARE,NAME:SHARE, got {text!r}") from None
        if not sep:
            raise ValueError(f"{field_name} must look like NAME:SHARE,NAME:SHARE, got {text!r}")
    return shares


def build_trace(args: argparse.Namespace):
    if args.trace:
        return load_trace(args.trace)
    prompt_len, output_len = args.prompt_len, args.output_len
    if args.lengths:
        prompt_len, output_len, source = LENGTH_PRESETS[args.lengths]
        print(f"lengths {args.lengths}: {source}")
    spec = TraceSpec(num_requests=args.num_requests, rate=args.rate, arrival=args.arrival, cv=args.cv,
                     prompt_len=prompt_len, output_len=output_len,
                     tenants=parse_shares(args.tenants, "tenants"),
                     priorities=parse_shares(args.priorities, "priorities", int),
                     system_prompt_len=args.system_prompt_len, seed=args.seed)
    return generate_trace(spec)


def print_table(summaries: list[dict]) -> None:
    """The overall table, then per tenant and per priority class where the trace has them."""
    head = (f"{'policy':<24}{'goodput':>8}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p90':>9}{'p99':>9}"
            f"{'TPOT p50':>10}{'p90':>8}{'p99':>8}{'E2E p99':>9}{'preempt':>9}{'Jain':>6}{'sim s':>7}")
    print(head)
    for s in summaries:
        t, p, e = s["ttft_s"], s["tpot_s"], s["e2e_s"]
        print(f"{s['policy'][-23:]:<24}{s['goodput']:>8.1%}{s['throughput_req_s']:>8.2f}"
              f"{s['throughput_out_tok_s']:>11.1f}{t['p50']:>10.3f}{t['p90']:>9.3f}{t['p99']:>9.3f}"
              f"{p['p50']:>10.4f}{p['p90']:>8.4f}{p['p99']:>8.4f}{e['p99']:>9.2f}{s['num_preemptions']:>9d}"
              f"{s['jain_fairness']:>6.2f}{s['sim_wall_s']:>7.2f}")
    if any(s["per_tenant"] for s in summaries):
        print(f"\n{'policy':<24}{'tenant':<12}{'requests':>9}{'tok share':>10}{'TTFT p50':>10}{'p90':>9}"
              f"{'p99':>9}{'TPOT p50':>10}{'p90':>8}{'p99':>8}")
        for s in summaries:
            for tenant, ts in s["per_tenant"].items():
                t, p = ts["ttft_s"], ts["tpot_s"]
                print(f"{s['policy'][-23:]:<24}{tenant:<12}{ts['num_requests']:>9d}{ts['share_of_out_tokens']:>10.2f}"
                      f"{t['p50']:>10.3f}{t['p90']:>9.3f}{t['p99']:>9.3f}{p['p50']:>10.4f}{p['p90']:>8.4f}"
                      f"{p['p99']:>8.4f}")
    if any(s["per_priority"] for s in summaries):
        print(f"\n{'policy':<24}{'priority':>9}{'requests':>9}{'TTFT p50':>10}{'p90':>9}{'p99':>9}"
              f"{'TPOT p50':>10}{'p90':>8}{'p99':>8}{'target':>8}{'met':>7}")
        for s in summaries:
            for prio, ps in s["per_priority"].items():
                t, p = ps["ttft_s"], ps["tpot_s"]
                met = (f"{ps['ttft_target_s']:>8g}{ps['ttft_target_met']:>7.0%}" if "ttft_target_met" in ps
                       else f"{'-':>8}{'-':>7}")
                print(f"{s['policy'][-23:]:<24}{prio:>9}{ps['num_requests']:>9d}{t['p50']:>10.3f}"
                      f"{t['p90']:>9.3f}{t['p99']:>9.3f}{p['p50']:>10.4f}{p['p90']:>8.4f}{p['p99']:>8.4f}{met}")


def plot(results: list[SimResult], path: Path, ttft_slo: float | None = None,
         tpot_slo: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for r in results:
        ttft = np.sort([rec.ttft for rec in r.records])
        axes[0, 0].plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=r.policy)
        axes[0, 1].plot(r.timeline.time, r.timeline.kv_usage, label=r.policy, lw=0.8)
        axes[1, 0].plot(r.timeline.time, r.timeline.num_waiting, label=r.policy, lw=0.8)
        tpot = np.sort([rec.tpot for rec in r.records if np.isfinite(rec.tpot)])
        axes[0, 2].plot(tpot, np.arange(1, len(tpot) + 1) / max(len(tpot), 1), label=r.policy)
    axes[0, 2].set(xlabel="TPOT (s)", ylabel="fraction of requests", title="TPOT CDF", xscale="log")
    axes[1, 2].bar(np.arange(len(results)), [r.goodput(ttft_slo, tpot_slo) for r in results],
                   color=[f"C{i}" for i in range(len(results))])
    axes[1, 2].set_xticks(np.arange(len(results)), [r.policy for r in results], fontsize=8)
    axes[1, 2].set(ylabel="fraction meeting both targets", ylim=(0, 1),
                   title=f"goodput (TTFT <= {ttft_slo} s, TPOT <= {tpot_slo} s)")
    axes[0, 0].set(xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF", xscale="symlog")
    axes[0, 1].set(xlabel="simulated time (s)", ylabel="fraction of KV blocks in use", title="KV usage")
    axes[1, 0].set(xlabel="simulated time (s)", ylabel="requests", title="waiting queue")
    # per tenant when the trace has tenants, else per priority class (else: one bar per policy)
    tenants = sorted({rec.tenant for r in results for rec in r.records if rec.tenant is not None})
    classes = sorted({rec.priority for r in results for rec in r.records})
    if tenants:
        groups, key, title = tenants, (lambda rec: rec.tenant), "per-tenant TTFT"
    else:
        groups, key, title = classes, (lambda rec: rec.priority), "TTFT per priority class"
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        means = [percentiles([x.ttft for x in r.records if key(x) == g])["mean"] for g in groups]
        axes[1, 1].bar(np.arange(len(groups)) + i * width, means, width, label=r.policy)
    axes[1, 1].set_xticks(np.arange(len(groups)) + width * (len(results) - 1) / 2, [str(g) for g in groups])
    axes[1, 1].set(ylabel="mean TTFT (s)", title=title)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate(args: argparse.Namespace, trace) -> dict:
    """Replays the trace on the real engine under the first policy; compares with ``sim``."""
    import os

    from benchmarks.calibrate import machine_is_quiet, make_engine, measure_steps, run_trace_on_engine

    quiet, why = machine_is_quiet(os.getloadavg()[0], os.cpu_count() or 1)
    if not quiet:
        print(f"refusing to validate: {why} (see benchmarks/validate.py)")
        return {"refused": why}
    args.policy = args.policies.split(",")[0]
    engine = make_engine(args)
    measure_steps(engine, [2], [32], 3, seed=1)  # warm-up, as in calibration
    records = run_trace_on_engine(engine, trace, seed=args.seed)
    real = SimResult(args.policy, records, Timeline(), 0, engine.scheduler.num_preemptions, 0.0).summary()
    # Re-simulate with the engine's exact settings (block count, model length, vocabulary).
    config = SimConfig(num_blocks=engine.num_blocks, block_size=args.block_size,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_model_len=engine.max_model_len, vocab_size=engine.hf_config.vocab_size,
                       seed=args.seed)
    predicted = simulate(trace, args.policy, config, load_cost_model(args.cost_model)).summary()
    report = {"num_requests": len(trace), "policy": args.policy}
    metrics = {"throughput_out_tok_s": lambda s: s["throughput_out_tok_s"],
               "ttft_mean_s": lambda s: s["ttft_s"]["mean"], "e2e_mean_s": lambda s: s["e2e_s"]["mean"]}
    for name, get in metrics.items():
        sim_v, real_v = get(predicted), get(real)
        report[name] = {"sim": sim_v, "real": real_v, "rel_error": (sim_v - real_v) / real_v}
        print(f"{name:<22} sim {sim_v:10.3f}   real {real_v:10.3f}   error {(sim_v - real_v) / real_v:+.1%}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="fcfs,sjf,fair",
                        help="comma-separated policy names or module:Class paths")
    parser.add_argument("--trace", help="a JSON-lines trace file (overrides the synthetic options)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    parser.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation")
    parser.add_argument("--prompt-len", default="lognormal:128:0.8:1024")
    parser.add_argument("--output-len", default="lognormal:64:0.8:512")
    parser.add_argument("--lengths", choices=sorted(LENGTH_PRESETS),
                        help="prompt and output lengths matching a public trace's published statistics "
                             "(overrides --prompt-len/--output-len; engine/scheduler/traces.py names the source)")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT target in seconds for goodput")
    parser.add_argument("--tpot-slo", type=float, default=0.1, help="TPOT target in seconds for goodput")
    parser.add_argument("--tenants", help="e.g. heavy:0.8,light:0.2")
    parser.add_argument("--priorities", help="e.g. 0:0.3,1:0.7")
    parser.add_argument("--ttft-targets", help="TTFT target per priority class in seconds, e.g. 0:1,1:30: "
                        "prints the share of each class's requests that met it")
    parser.add_argument("--system-prompt-len", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-trace", help="write the trace used as JSON lines")
    add_engine_args(parser)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--static-batching", action="store_true")
    parser.add_argument("--cost-model", help="JSON from benchmarks.calibrate (default: built-in)")
    parser.add_argument("--out-dir", default="benchmarks/out")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--validate", action="store_true", help="also run the real engine on the trace")
    args = parser.parse_args(argv)

    trace = build_trace(args)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    config = SimConfig(num_blocks=args.num_blocks, block_size=args.block_size,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                       static_batching=args.static_batching, seed=args.seed)
    cost_model = load_cost_model(args.cost_model)
    print(f"{len(trace)} requests; cost model: {cost_model.source}")
    # slo estimates prefill at the cost model's speed (the built-in model's is its default, 4000 tok/s)
    slo = SLOPolicy(args.ttft_slo, args.tpot_slo, prefill_tokens_per_s=1.0 / max(cost_model.per_token_s, 1e-9))
    results = [simulate(trace, slo if p == "slo" else p, config, cost_model) for p in args.policies.split(",") if p]
    targets = parse_shares(args.ttft_targets, "ttft-targets", int)
    summaries = [r.summary(targets, args.ttft_slo, args.tpot_slo) for r in results]
    print_table(summaries)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = {"config": vars(args), "summaries": summaries}
    if not args.no_plot:
        plot(results, out_dir / "simulate.png", args.ttft_slo, args.tpot_slo)
        print(f"wrote {out_dir / 'simulate.png'}")
    if args.validate:
        output["validation"] = validate(args, trace)
    (out_dir / "simulate_summary.json").write_text(json.dumps(output, indent=2, default=str))
    print(f"wrote {out_dir / 'simulate_summary.json'}")


if __name__ == "__main__":
    main()
