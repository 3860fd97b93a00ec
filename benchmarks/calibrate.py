"""Measures the real engine's step time and fits the simulator's cost model to it.

    python -m benchmarks.calibrate [--model PATH] [--repeats 3] [--num-threads 1] [--out benchmarks/out/cost_model.json]

Calibration runs `LLMEngine` on bursts of requests of several batch sizes and prompt lengths,
each burst ``--repeats`` times. Request i of a burst generates ``--max-tokens + i`` tokens, so
as the burst drains its decode batch passes through every size from the burst's down to 1: the
steps cover prefill chunks, mixed steps and decodes of every batch size at several context
lengths. That matters on a CPU, where BLAS runs some row counts (1, 4, 16) much faster than
their neighbours (2, 3, 5, 7); a fit to the fast ones alone underpredicted the decodes real
traces run by 15-30 %; the cost model also keeps a residual per row count up to the largest
burst (``--row-table``). Each step is timed as a whole ``LLMEngine.step()`` call (scheduling,
metadata, forward, sampling, output processing; the Python parts' share is recorded), every step
shape (new tokens, sum of context lengths, sequences) gets the median of its wall times over the
repeats, and `CostModel` is fitted to those medians. The JSON records the host: CPU model and
SIMD flags, torch's CPU capability, threads, dtype, load average.

The engine and the simulator are compared by ``benchmarks/validate.py`` (``--validate`` here
forwards to it). Both use `machine_is_quiet`, the rule for a machine too busy to measure: the
1-minute load average must be at most ``nproc / 2 + 1`` (our own process counts about one), and
a reference matmul timed before and after a run must agree within 15 %.
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
from engine.scheduler.simulator import RequestRecord
from engine.scheduler.traces import TraceRequest


class RecordingScheduler(Scheduler):
    """The engine's scheduler, remembering what the last step scheduled (for the cost fit)."""

    last: SchedulerOutput | None = None
    last_sum_context: int = 0

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        self.last = out
        self.last_sum_context = sum(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled)
        return out


def make_engine(args: argparse.Namespace, policy=None):
    """An `LLMEngine` from the common command-line flags, with a recording scheduler running
    ``policy`` (a `SchedulingPolicy` instance, e.g. a configured `SLOPolicy`) or ``args.policy``."""
    from engine.llm_engine import LLMEngine

    config = EngineConfig(model=args.model, dtype=args.dtype, num_blocks=args.num_blocks,
                          block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs, scheduling_policy=args.policy, seed=0,
                          num_threads=args.num_threads)
    engine = LLMEngine(config)
    # Swapped before any request exists, so no state is lost.
    old = engine.scheduler
    engine.scheduler = RecordingScheduler(old.config, old.kv, policy if policy is not None else old.policy)
    return engine


def timed_step(engine, samples: list[StepSample] | None, python_s: list[float] | None = None):
    """One whole ``engine.step()``, timed; appends its shape and time to ``samples`` and the
    time spent in Python around the forward (schedule, update, outputs) to ``python_s``."""
    t0 = time.perf_counter()
    outputs = engine.step()
    seconds = time.perf_counter() - t0
    sched = engine.scheduler
    if samples is not None and sched.last is not None and not sched.last.is_empty:
        samples.append(StepSample(sched.last.num_batched_tokens, sched.last_sum_context,
                                  len(sched.last.scheduled), seconds))
        if python_s is not None:
            python_s.append(engine.stats.last_schedule_time + engine.stats.last_output_time)
    sched.last = None
    return outputs


def random_prompt(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, size=length).tolist()


def measure_steps(engine, batch_sizes: list[int], prompt_lens: list[int], max_tokens: int,
                  seed: int = 0, python_s: list[float] | None = None) -> list[StepSample]:
    """Runs one burst per (batch size, prompt length) and returns every step's sample. Request
    i of a burst generates ``max_tokens + i`` tokens, so the decode batch drains one by one."""
    rng = np.random.default_rng(seed)
    vocab = engine.hf_config.vocab_size
    samples: list[StepSample] = []
    for batch in batch_sizes:
        for plen in prompt_lens:
            for i in range(batch):
                engine.add_request(f"cal-{batch}-{plen}-{i}", random_prompt(rng, plen, vocab),
                                   SamplingParams(max_tokens=max_tokens + i, ignore_eos=True, temperature=0.0))
            while engine.has_unfinished_requests():
                timed_step(engine, samples, python_s)
    return samples


def run_trace_on_engine(engine, trace: list[TraceRequest], seed: int = 0,
                        samples: list[StepSample] | None = None,
                        loop: dict | None = None) -> list[RequestRecord]:
    """Replays the trace in real time (requests join at the first step boundary after their
    arrival, as in the simulator) and returns records with times relative to the start. With
    ``loop`` given, adds ``iterations`` and ``seconds``: the loop iterations that stepped the
    engine and their whole wall time (admission and output handling included), to compare with
    the time inside ``engine.step()`` that ``samples`` holds."""
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
        if loop is not None:  # this iteration, from its clock read to here
            loop["iterations"] = loop.get("iterations", 0) + 1
            loop["seconds"] = loop.get("seconds", 0.0) + (time.time() - start - now)
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


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads; keep it the same for calibration and validation")


def median_samples(samples: list[StepSample]) -> list[StepSample]:
    """One sample per step shape, with the median of its measured times."""
    by_shape: dict[tuple[int, int, int], list[float]] = {}
    for x in samples:
        by_shape.setdefault((x.num_batched_tokens, x.sum_context, x.num_seqs), []).append(x.seconds)
    return [StepSample(*shape, float(np.median(times))) for shape, times in by_shape.items()]


def main(argv: list[str] | None = None) -> None:
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if "--validate" in argv:  # the old spelling of `python -m benchmarks.validate`
        from benchmarks import validate

        return validate.main([a for a in argv if a != "--validate"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--batch-sizes", default="1,2,3,5,8,16",
                        help="burst sizes; each burst's decode batch also drains through every smaller size")
    parser.add_argument("--prompt-lens", default="16,128,384")
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens of a burst's first request (request i: +i)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each burst; each step shape's median is fitted")
    parser.add_argument("--row-table", type=int, default=None,
                        help="fit the residual of steps of 1..N new tokens (default: the largest burst; 0: none)")
    parser.add_argument("--out", default="benchmarks/out/cost_model.json")
    args = parser.parse_args(argv)

    matmul_before = reference_matmul_s()
    engine = make_engine(args)
    measure_steps(engine, [2], [32], 3, seed=1)  # warm-up, not recorded
    host = host_info(engine)
    started = time.perf_counter()
    samples: list[StepSample] = []
    python_s: list[float] = []
    for rep in range(args.repeats):  # same shapes each time (same seed): medians per shape
        samples += measure_steps(engine, [int(b) for b in args.batch_sizes.split(",")],
                                 [int(p) for p in args.prompt_lens.split(",")], args.max_tokens, python_s=python_s)
    medians = median_samples(samples)
    row_table = args.row_table if args.row_table is not None else max(int(b) for b in args.batch_sizes.split(","))
    model = CostModel.fit(medians, source=f"calibrated: {engine.model_name} dtype={engine.dtype} "
                                          f"device={engine.device} budget={args.max_num_batched_tokens}",
                          row_table=row_table)
    matmul_after = reference_matmul_s()
    quiet, why = machine_is_quiet(host["loadavg_1m"], host["nproc"] or 1, matmul_before, matmul_after)
    model.fit_info.update({
        "host": {**host, "loadavg_1m_after": os.getloadavg()[0]}, "repeats": args.repeats,
        "num_steps_measured": len(samples), "batch_sizes": args.batch_sizes, "prompt_lens": args.prompt_lens,
        "python_share_of_step": float(np.sum(python_s) / max(sum(s.seconds for s in samples), 1e-12)),
        "matmul_before_s": matmul_before, "matmul_after_s": matmul_after, "machine": why})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.to_json(args.out)
    Path(args.out).with_suffix(".samples.json").write_text(json.dumps([asdict(s) for s in samples]))
    print(f"{len(samples)} steps ({len(medians)} shapes) measured in {time.perf_counter() - started:.1f}s; "
          f"fit error {model.fit_info['mean_abs_rel_error']:.1%} on the medians "
          f"(decodes {model.fit_info['decode_mean_abs_rel_error']:.1%}); Python "
          f"{model.fit_info['python_share_of_step']:.1%} of step time")
    if not quiet:
        print(f"warning: fitted on a loaded machine ({why}); the coefficients include the other load")
    print(json.dumps(asdict(model), indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
