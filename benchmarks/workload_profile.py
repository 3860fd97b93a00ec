"""Where the time of a whole offline run goes: `torch.profiler` over one `LLM.generate` of the
throughput benchmark's fixed workload, self CPU time grouped into the parts named in issue 13.

Usage::

    python -m benchmarks.workload_profile --model benchmarks/out/h14_run2/models/llama-56m \
        --num-requests 32 --prompt-len 128 --output-len 64

Prints one table (part, self CPU ms, share) and the profile's total next to the run's own CPU
seconds, so the profiler's overhead is visible. Regions are labelled by wrapping the greedy
head, the full logits and the sampler with `record_function`; every op under a label counts
for that label, the rest are grouped by op name. Like every figure here, it is a sample of one
machine at one load: record `lscpu`, the load average and the date with it.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.workloads import fixed_workload, mixed_workload

# op-name prefixes -> part (first match wins); labelled regions take precedence
_PARTS = (
    ("linears (own GEMM / oneDNN / BLAS)", ("conveyor_cpu::cpu_gemm", "mkldnn::_linear_pointwise", "aten::addmm",
                                            "aten::mm", "aten::linear")),
    ("paged attention (C++)", ("conveyor_cpu::paged_attention",)),
    ("norm, rotary, SiLU (fused C++)", ("conveyor_cpu::",)),
    ("norm, rotary, SiLU, residual (torch)", ("aten::rms_norm", "aten::_fused_rms_norm", "aten::silu", "aten::mul",
                                              "aten::add", "aten::rsqrt", "aten::pow", "aten::mean", "aten::neg")),
    ("K/V writes", ("aten::index_copy", "aten::index_put")),
    ("argmax", ("aten::argmax",)),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
)
_LABELS = ("greedy LM head (int8 screen + recompute)", "full LM head (logits)", "sampler")


def _wrap(obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)

    setattr(obj, name, wrapped)


def _part(event) -> str:
    node = event
    while node is not None:
        if node.name in _LABELS:
            return node.name
        node = node.cpu_parent
    for part, prefixes in _PARTS:
        if event.name.startswith(prefixes):
            return part
    return "other (views, metadata, Python-side ops)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the engine's default model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--mixed", action="store_true",
                   help="the throughput benchmark's mixed workload (prompts 16-512, outputs 16-128) instead")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from engine import LLM, SamplingParams

    llm = LLM(model=a.model, dtype=a.dtype, num_threads=a.threads)
    runner, model = llm.engine.runner, llm.engine.model
    if getattr(model, "greedy_head", None) is not None:
        _wrap(model.greedy_head, "argmax", _LABELS[0])
    _wrap(model, "compute_logits", _LABELS[1])
    _wrap(type(runner.sampler), "__call__", _LABELS[2])  # dunder: looked up on the type
    # the same requests as benchmarks/throughput.py's (same builders, same seed)
    wl = (mixed_workload(a.num_requests, (16, 512), (16, 128), a.seed) if a.mixed
          else fixed_workload(a.num_requests, a.prompt_len, a.output_len, a.seed))
    prompts = [list(r.prompt_ids) for r in wl.requests]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in wl.requests]
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), use_tqdm=False)
    c0, t0 = time.process_time(), time.time()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    cpu, wall = time.process_time() - c0, time.time() - t0
    totals: dict[str, float] = {}
    for ev in prof.events():
        part = _part(ev)
        totals[part] = totals.get(part, 0.0) + ev.self_cpu_time_total / 1000.0
    total = sum(totals.values())
    print(f"model {a.model or 'default'}, {a.dtype}, {a.threads} thread(s), workload {wl.name}; "
          f"run: {cpu:.2f} CPU-s, {wall:.2f} wall-s; profiled ops: {total / 1000:.2f} s; load {os.getloadavg()[0]:.2f}")
    print("| part | self CPU ms | share |\n| --- | ---: | ---: |")
    for part, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {ms:.0f} | {100 * ms / total:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
