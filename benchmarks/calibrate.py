"""Measures the real engine's step time, fits the simulator's cost model to it, and validates
the simulator against the engine.

    python -m benchmarks.calibrate [--model PATH] [--repeats 3] [--out benchmarks/out/cost_model.json]
    python -m benchmarks.calibrate --validate --cost-model benchmarks/out/cost_model.json

Calibration runs `LLMEngine` on bursts of requests of several batch sizes and prompt lengths (so
the steps cover prefill chunks, mixed steps and decodes at several context lengths), each burst
``--repeats`` times; every step shape (new tokens, sum of context lengths, sequences) gets the
median of its wall times over the repeats, and `CostModel` is fitted to those medians by
non-negative least squares. The JSON records the host: CPU model and SIMD flags, torch's CPU
capability, threads, dtype, load average.

``--validate`` runs the real engine and the simulator (same engine settings, same trace) on three
workloads (short chat, long-prompt summarization, mixed) under two policies and reports the
simulator's relative error on throughput, mean and p90 TTFT, mean TPOT and mean end-to-end
latency. It refuses to run on a visibly loaded machine, by this rule (`machine_is_quiet`): the
1-minute load average must be at most ``nproc / 2 + 1`` (our own process counts about one), and a
reference matmul timed before and after the run must agree within 15 %; a run that fails the
second test is reported as invalid. ``--force`` runs anyway and marks the figures "loaded".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler.cost_model import CostModel, StepSample
from engine.scheduler.scheduler import Scheduler, SchedulerOutput
from engine.scheduler.simulator import RequestRecord, SimConfig, SimResult, Timeline, simulate
from engine.scheduler.traces import TraceRequest, TraceSpec, generate_trace


class RecordingScheduler(Scheduler):
    """The engine's scheduler, remembering what the last step scheduled (for the cost fit)."""

    last: SchedulerOutput | None = None
    last_sum_context: int = 0

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        self.last = out
        self.last_sum_context = sum(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled)
        return out


def make_engine(args: argparse.Namespace):
    """An `LLMEngine` from the common command-line flags, with a recording scheduler."""
    from engine.llm_engine import LLMEngine

    config = EngineConfig(model=args.model, dtype=args.dtype, num_blocks=args.num_blocks,
                          block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs, scheduling_policy=args.policy, seed=0)
    engine = LLMEngine(config)
    # Swapped before any request exists, so no state is lost.
    old = engine.scheduler
    engine.scheduler = RecordingScheduler(old.config, old.kv, old.policy)
    return engine


def timed_step(engine, samples: list[StepSample] | None):
    t0 = time.perf_counter()
    outputs = engine.step()
    seconds = time.perf_counter() - t0
    sched = engine.scheduler
    if samples is not None and sched.last is not None and not sched.last.is_empty:
        samples.append(StepSample(sched.last.num_batched_tokens, sched.last_sum_context,
                                  len(sched.last.scheduled), seconds))
    sched.last = None
    return outputs


def random_prompt(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, size=length).tolist()


def measure_steps(engine, batch_sizes: list[int], prompt_lens: list[int], max_tokens: int,
                  seed: int = 0) -> list[StepSample]:
    """Runs one burst per (batch size, prompt length) and returns every step's sample."""
    rng = np.random.default_rng(seed)
    vocab = engine.hf_config.vocab_size
    samples: list[StepSample] = []
    for batch in batch_sizes:
        for plen in prompt_lens:
            for i in range(batch):
                engine.add_request(f"cal-{batch}-{plen}-{i}", random_prompt(rng, plen, vocab),
                                   SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
            while engine.has_unfinished_requests():
                timed_step(engine, samples)
    return samples


def run_trace_on_engine(engine, trace: list[TraceRequest], seed: int = 0,
                        samples: list[StepSample] | None = None) -> list[RequestRecord]:
    """Replays the trace in real time (requests join at the first step boundary after their
    arrival, as in the simulator) and returns records with times relative to the start."""
    rng = np.random.default_rng(seed)
    vocab = engine.hf_config.vocab_size
    trace = sorted(trace, key=lambda r: r.arrival_time)
    prompts = [random_prompt(rng, t.prompt_len, vocab) for t in trace]
    by_id = {t.request_id: t for t in trace}
    records: list[RequestRecord] = []
    start = time.time()
    next_i = 0
    while next_i < len(trace) or engine.has_unfinished_requests():
        now = time.time() - start
        while next_i < len(trace) and trace[next_i].arrival_time <= now:
            t = trace[next_i]
            engine.add_request(t.request_id, prompts[next_i],
                               SamplingParams(max_tokens=t.output_len, ignore_eos=True, temperature=0.0),
                               arrival_time=start + t.arrival_time, priority=t.priority, tenant=t.tenant)
            next_i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, trace[next_i].arrival_time - now))
            continue
        for out in timed_step(engine, samples):
            if out.finished:
                t, m = by_id[out.request_id], out.metrics
                records.append(RequestRecord(
                    t.request_id, t.tenant, t.priority, t.prompt_len, len(out.outputs[0].token_ids),
                    m.arrival_time - start, m.first_scheduled_time - start, m.first_token_time - start,
                    m.finished_time - start if m.finished_time else time.time() - start,
                    num_cached_tokens=out.num_cached_tokens))
    return records


# ---- the host and its load ------------------------------------------------------------------

def host_info(engine=None) -> dict:
    """CPU model and SIMD flags, torch's CPU capability and threads, the engine's dtype, load."""
    import torch

    model, flags = platform.processor(), []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split()
                               if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
                break
    except OSError:
        pass
    return {"cpu": model, "simd_flags": flags, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "nproc": os.cpu_count(), "torch": torch.__version__,
            "dtype": str(engine.dtype) if engine is not None else None,
            "device": str(engine.device) if engine is not None else None,
            "loadavg_1m": os.getloadavg()[0]}


def reference_matmul_s(n: int = 384, repeats: int = 7) -> float:
    """Median seconds of one n x n float32 matmul on one thread: the machine's speed right now.
    One thread always, because the engine changes torch's thread count between the before and
    after measurements (a 2-thread "before" against a 1-thread "after" read as +94 % drift)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append((time.perf_counter() - t0) / 4)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times))


def machine_is_quiet(loadavg_1m: float, nproc: int, matmul_before_s: float | None = None,
                     matmul_after_s: float | None = None) -> tuple[bool, str]:
    """The rule validation runs under: load average <= nproc / 2 + 1 and, when both are given,
    reference matmul times before and after within 15 % of each other. Returns (ok, reason)."""
    limit = nproc / 2 + 1
    if loadavg_1m > limit:
        return False, f"1-minute load average {loadavg_1m:.1f} > {limit:.1f} (nproc {nproc} / 2 + 1)"
    if matmul_before_s and matmul_after_s:
        drift = matmul_after_s / matmul_before_s - 1
        if abs(drift) > 0.15:
            return False, f"reference matmul drifted {drift:+.0%} during the run (limit 15%)"
    return True, "quiet"


# ---- validation: the engine and the simulator on the same traces ------------------------------

WORKLOADS = {  # name: (prompt_len, output_len, rate req/s); sized for a small CPU model
    "short-chat": ("lognormal:48:0.6:256", "lognormal:32:0.6:96", 1.0),
    "summarization": ("uniform:300:480", "uniform:8:24", 0.3),
    "mixed": ("lognormal:96:1.2:480", "lognormal:24:1.0:96", 0.6),
}
METRICS = {"throughput_out_tok_s": lambda s: s["throughput_out_tok_s"], "ttft_mean_s": lambda s: s["ttft_s"]["mean"],
           "ttft_p90_s": lambda s: s["ttft_s"]["p90"], "tpot_mean_s": lambda s: s["tpot_s"]["mean"],
           "e2e_mean_s": lambda s: s["e2e_s"]["mean"]}


def validate_one(args: argparse.Namespace, trace: list[TraceRequest], policy: str, cost_model: CostModel) -> dict:
    """One workload under one policy: the real engine, then the simulator with its exact settings."""
    args.policy = policy
    engine = make_engine(args)
    measure_steps(engine, [2], [32], 3, seed=1)  # warm-up, as in calibration
    records = run_trace_on_engine(engine, trace, seed=args.seed)
    real = SimResult(policy, records, Timeline(), 0, engine.scheduler.num_preemptions, 0.0).summary()
    config = SimConfig(num_blocks=engine.num_blocks, block_size=args.block_size,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_model_len=engine.max_model_len, vocab_size=engine.hf_config.vocab_size, seed=args.seed)
    sim = simulate(trace, policy, config, cost_model).summary()
    out = {}
    for name, get in METRICS.items():
        s, r = get(sim), get(real)
        out[name] = {"sim": s, "real": r, "rel_error": (s - r) / r if r else float("nan")}
    return out


def validate(args: argparse.Namespace) -> dict:
    cost_model = CostModel.from_json(args.cost_model) if args.cost_model else CostModel()
    before = reference_matmul_s()
    ok, why = machine_is_quiet(os.getloadavg()[0], os.cpu_count() or 1)
    report = {"host": host_info(), "cost_model": asdict(cost_model), "matmul_before_s": before, "results": {}}
    if not ok and not args.force:
        report["refused"] = why
        print(f"refusing to validate: {why}. A fidelity figure taken now would measure the other load, not "
              f"the simulator; rerun when the machine is quiet (or pass --force to mark the figures 'loaded').")
        return report
    report["loaded"] = not ok
    for name, (prompt_len, output_len, rate) in WORKLOADS.items():
        trace = generate_trace(TraceSpec(num_requests=args.num_requests, rate=rate, prompt_len=prompt_len,
                                         output_len=output_len, seed=args.seed))
        for policy in args.policies.split(","):
            res = validate_one(args, trace, policy, cost_model)
            report["results"][f"{name}/{policy}"] = res
            print(f"{name:<14}{policy:<6}" + "".join(f"{k} {v['rel_error']:+.0%}  " for k, v in res.items()), flush=True)
    report["matmul_after_s"] = after = reference_matmul_s()
    ok_after, why_after = machine_is_quiet(os.getloadavg()[0], os.cpu_count() or 1, before, after)
    if not ok_after:
        report["invalid"] = why_after
        print(f"these figures are not a fidelity measurement: {why_after}")
    return report


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=32)


def median_samples(samples: list[StepSample]) -> list[StepSample]:
    """One sample per step shape, with the median of its measured times."""
    by_shape: dict[tuple[int, int, int], list[float]] = {}
    for x in samples:
        by_shape.setdefault((x.num_batched_tokens, x.sum_context, x.num_seqs), []).append(x.seconds)
    return [StepSample(*shape, float(np.median(times))) for shape, times in by_shape.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompt-lens", default="16,128,384")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each burst; each step shape's median is fitted")
    parser.add_argument("--out", default="benchmarks/out/cost_model.json")
    parser.add_argument("--validate", action="store_true", help="compare engine and simulator (see above)")
    parser.add_argument("--cost-model", help="--validate: the fitted model to check (default: built-in)")
    parser.add_argument("--policies", default="fcfs,slo", help="--validate: two policies")
    parser.add_argument("--num-requests", type=int, default=40, help="--validate: requests per workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="--validate even on a loaded machine")
    parser.add_argument("--report", default="benchmarks/out/validation.json")
    args = parser.parse_args(argv)

    if args.validate:
        report = validate(args)
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.report}")
        return
    engine = make_engine(args)
    measure_steps(engine, [2], [32], 3, seed=1)  # warm-up, not recorded
    host = host_info(engine)
    started = time.perf_counter()
    samples: list[StepSample] = []
    for rep in range(args.repeats):  # same shapes each time (same seed): medians per shape
        samples += measure_steps(engine, [int(b) for b in args.batch_sizes.split(",")],
                                 [int(p) for p in args.prompt_lens.split(",")], args.max_tokens)
    medians = median_samples(samples)
    model = CostModel.fit(medians, source=f"calibrated: {engine.model_name} dtype={engine.dtype} "
                                          f"device={engine.device} budget={args.max_num_batched_tokens}")
    model.fit_info.update({"host": {**host, "loadavg_1m_after": os.getloadavg()[0]}, "repeats": args.repeats,
                           "num_steps_measured": len(samples)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.to_json(args.out)
    Path(args.out).with_suffix(".samples.json").write_text(json.dumps([asdict(s) for s in samples]))
    print(f"{len(samples)} steps ({len(medians)} shapes) measured in {time.perf_counter() - started:.1f}s; "
          f"fit error {model.fit_info['mean_abs_rel_error']:.1%} on the medians")
    quiet, why = machine_is_quiet(host["loadavg_1m"], host["nproc"] or 1)
    if not quiet:
        print(f"warning: fitted on a loaded machine ({why}); the coefficients include the other load")
    print(json.dumps(asdict(model), indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
