"""Where one decode step's time goes: Python per phase (model stubbed) and the whole step.

Builds the default model (or ``--model``), admits ``--batch`` requests with ``--context``-token
prompts, prefills them, then times decode steps: the engine's own phase split (schedule +
update, runner, outputs), a cProfile of the Python outside the forward pass (the model replaced
by a stub that returns zeros of the right shape), and CPU time alongside wall time, since the
machine may be shared. Usage: ``python -m benchmarks.step_profile [--batch 16] [--context 130]``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import time

import torch


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_engine(args):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    cfg = EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                       attention_backend=args.backend, num_blocks=args.num_blocks)
    return LLMEngine(cfg)


def add_batch(engine, args, tag: str) -> None:
    from engine.sampling_params import SamplingParams

    vocab = engine.hf_config.vocab_size
    for i in range(args.batch):
        prompt = [(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(args.context)]
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(max_tokens=3 * args.steps + 8, temperature=0,
                                                               ignore_eos=True))


def run_steps(engine, n: int) -> tuple[float, float, dict]:
    phases = {"schedule+update": 0.0, "runner": 0.0, "outputs": 0.0}
    w0, c0 = time.perf_counter(), _cpu()
    for _ in range(n):
        engine.step()
        s = engine.stats
        phases["schedule+update"] += s.last_schedule_time
        phases["runner"] += s.last_execute_time
        phases["outputs"] += s.last_output_time
    return (time.perf_counter() - w0) / n, (_cpu() - c0) / n, {k: v / n for k, v in phases.items()}


class StubModel(torch.nn.Module):
    """Stands in for the forward pass: zeros of the right shape, and a cheap lm head."""

    def __init__(self, real):
        super().__init__()
        self.real = real
        self.kv_spec = real.kv_spec
        self.hidden = real.lm_head_weight().shape[1]
        self.vocab = real.lm_head_weight().shape[0]

    def forward(self, input_ids, positions, kv_caches, meta):
        return torch.zeros(input_ids.shape[0], self.hidden)

    def compute_logits(self, hidden):
        logits = torch.zeros(hidden.shape[0], self.vocab)
        logits[:, 100] = 1.0
        return logits


CATEGORIES = (  # (label, op-name substrings), first match wins
    ("matmuls (linear layers, LM head)", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")),
    ("paged attention (C++ kernel)", ("conveyor_cpu::",)),
    ("K/V write (index_copy)", ("aten::index_copy",)),
    ("norms, rotary, SiLU, residual adds", ("aten::rms_norm", "aten::_fused_rms_norm", "aten::mul", "aten::add",
                                             "aten::sub", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt")),
    ("sampling (argmax)", ("aten::argmax", "aten::max")),
    ("copies and dtype casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
    ("embedding / index / gather", ("aten::embedding", "aten::index", "aten::gather")),
)


def torch_profile(engine, steps: int) -> None:
    """Time of the torch ops of ``steps`` decode steps, by category, as shares of all op time.
    The profiler times ops by the clock, so on a loaded machine absolute values are inflated;
    the shares hold as long as the load is even. The Python outside torch ops is measured
    separately (the stubbed-model run, in CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    c0 = _cpu()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    cpu_ms = (_cpu() - c0) * 1e3 / steps
    sums: dict[str, float] = {}
    calls = 0
    for ev in prof.key_averages():
        calls += ev.count
        label = next((lab for lab, keys in CATEGORIES if any(ev.key.startswith(k) for k in keys)), "other torch ops")
        sums[label] = sums.get(label, 0.0) + ev.self_cpu_time_total / steps
    ops = sum(sums.values())
    print(f"\ntorch.profiler, {steps} decode steps: {cpu_ms:.1f} ms CPU per step (profiler on), "
          f"{calls / steps:.0f} op calls per step, ops {ops / 1e3:.1f} ms by the clock per step")
    print("| part | share of torch-op time |\n| --- | ---: |")
    for label, us in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {100 * us / ops:.1f} % |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=130)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cprofile", type=int, default=25, help="rows of the stubbed-model cProfile to print")
    p.add_argument("--torch-profile", type=int, default=0, help="decode steps to profile by op category (0: none)")
    args = p.parse_args()
    print(f"load average {os.getloadavg()}")
    t0 = time.perf_counter()
    engine = make_engine(args)
    print(f"engine built in {time.perf_counter() - t0:.1f} s; backend {engine.model.model.layers[0].self_attn.backend.name}")
    real = engine.runner.model
    for r in range(args.rounds):
        engine.runner.model = real
        add_batch(engine, args, f"real{r}-")
        while any(req.num_computed_tokens < req.num_prompt_tokens for req in engine.scheduler.requests.values()):
            engine.step()
        engine.step()
        if r == 0 and args.torch_profile:
            torch_profile(engine, args.torch_profile)
        wall, cpu, ph = run_steps(engine, args.steps)
        print(f"round {r} whole step: wall {wall * 1e3:.1f} ms, cpu {cpu * 1e3:.1f} ms; " +
              ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in ph.items()))
        engine.abort_request(list(engine.outputs._groups))
        engine.step()
        engine.runner.model = StubModel(real)
        add_batch(engine, args, f"stub{r}-")
        while any(req.num_computed_tokens < req.num_prompt_tokens for req in engine.scheduler.requests.values()):
            engine.step()
        engine.step()
        wall, cpu, ph = run_steps(engine, args.steps)
        print(f"round {r} stubbed model: wall {wall * 1e3:.2f} ms, cpu {cpu * 1e3:.2f} ms; " +
              ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in ph.items()))
        if r == args.rounds - 1 and args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            run_steps(engine, args.steps)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.cprofile)
            print(s.getvalue())
        engine.abort_request(list(engine.outputs._groups))
        engine.step()
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
