"""Measures the real engine's step time and fits the simulator's cost model to it.

    python -m benchmarks.calibrate [--model PATH] [--out benchmarks/out/cost_model.json]

Runs `LLMEngine` on bursts of requests of several batch sizes and prompt lengths (so the steps
cover prefill chunks, mixed steps and decodes at several context lengths), records for every
step (new tokens, sum of context lengths, sequences, wall seconds of ``engine.step()``), fits
`CostModel` by non-negative least squares and writes it as JSON for ``benchmarks/simulate.py
--cost-model``. ``run_trace_on_engine`` replays a simulator trace on the real engine in real
time; ``benchmarks/simulate.py --validate`` uses it to check the simulator's predictions.
"""
from __future__ import annotations

import argparse
import json
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


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompt-lens", default="16,128,384")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/out/cost_model.json")
    args = parser.parse_args(argv)

    engine = make_engine(args)
    measure_steps(engine, [2], [32], 3, seed=1)  # warm-up, not recorded
    started = time.perf_counter()
    samples = measure_steps(engine, [int(b) for b in args.batch_sizes.split(",")],
                            [int(p) for p in args.prompt_lens.split(",")], args.max_tokens)
    model = CostModel.fit(samples, source=f"calibrated: {engine.model_name} dtype={engine.dtype} "
                                          f"device={engine.device} budget={args.max_num_batched_tokens}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.to_json(args.out)
    Path(args.out).with_suffix(".samples.json").write_text(json.dumps([asdict(s) for s in samples]))
    print(f"{len(samples)} steps measured in {time.perf_counter() - started:.1f}s; "
          f"fit error {model.fit_info['mean_abs_rel_error']:.1%}")
    print(json.dumps(asdict(model), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
