"""Times the multi-LoRA Triton kernels (engine/kernels/triton_lora.py) against the torch path.

    python -m benchmarks.gpu_lora [--out benchmarks/out/gpu_lora.json] [--quick]

Each case is one `add_lora` call at a Llama-8B projection shape (bf16, rank 16, 8 slots):
decode (tokens spread round-robin over the slots) and prefill (a few long segments). Both
paths get the step's `LoRAMapping` built beforehand, as the engine does. Every Triton result is
first checked against a float32 torch reference (max abs error, relative to the delta's
size); then timings are medians of CUDA-event measurements. Reported: microseconds per call,
GB/s of adapter weights + activations read and written, and the base projection's matmul time
for scale. Off CUDA it runs the same code under TRITON_INTERPRET=1 with tiny shapes (a smoke
test of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from engine.kernels.lora_ops import add_lora_torch, lora_mapping

NUM_SLOTS, RANK = 8, 16
# (name, in, out): Llama-3-8B's q/o, k/v, gate/up, down projections
SHAPES = [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096)]
TINY_SHAPES = [("tiny", 64, 48)]


def time_us(fn, reps: int = 20) -> float:
    """Median microseconds of fn() after warm-up (CUDA events on GPU, perf_counter elsewhere)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def token_slots(kind: str, num_tokens: int, device) -> torch.Tensor:
    if kind == "decode":
        return (torch.arange(num_tokens, device=device) % NUM_SLOTS).long()
    # prefill: 4 adapters' segments of equal length, the last quarter on the base model
    seg = torch.arange(num_tokens, device=device) * 4 // num_tokens
    return torch.where(seg == 3, -1, seg).long()


def run_case(name: str, n_in: int, n_out: int, kind: str, num_tokens: int, dtype, device) -> dict:
    from engine.kernels import triton_lora

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(num_tokens, n_in, generator=g).to(device, dtype)
    a = (torch.randn(NUM_SLOTS, RANK, n_in, generator=g) / n_in**0.5).to(device, dtype)
    b = (torch.randn(NUM_SLOTS, n_out, RANK, generator=g) / RANK**0.5).to(device, dtype)
    scaling = torch.full((NUM_SLOTS,), 2.0, device=device)
    slots = token_slots(kind, num_tokens, device)
    mapping = lora_mapping(slots, NUM_SLOTS)
    y0 = torch.zeros(num_tokens, n_out, device=device, dtype=dtype)
    ref = y0.float().clone()
    add_lora_torch(ref, x.float(), a.float(), b.float(), slots, scaling)
    y = y0.clone()
    triton_lora.add_lora(y, x, a, b, mapping, scaling)
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()

    y = y0.clone()
    t_triton = time_us(lambda: triton_lora.add_lora(y, x, a, b, mapping, scaling))
    t_torch = time_us(lambda: add_lora_torch(y, x, a, b, mapping, scaling))
    w = torch.randn(n_out, n_in, device=device, dtype=dtype)
    t_base = time_us(lambda: torch.nn.functional.linear(x, w))
    used = int(slots.max().item()) + 1 if kind == "prefill" else NUM_SLOTS
    nbytes = (used * RANK * (n_in + n_out) + num_tokens * (n_in + 2 * n_out)) * x.element_size()
    return {"name": f"{kind}_{name}", "tokens": num_tokens, "in": n_in, "out": n_out, "rel_err": err,
            "triton_us": round(t_triton, 1), "torch_us": round(t_torch, 1), "base_matmul_us": round(t_base, 1),
            "triton_GBps": round(nbytes / t_triton / 1e3, 1), "speedup_vs_torch": round(t_torch / t_triton, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "out", "gpu_lora.json"))
    p.add_argument("--quick", action="store_true", help="decode and prefill at q/o and gate/up only")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 for a CPU smoke test of this script", file=sys.stderr)
        return 2
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SHAPES if cuda else TINY_SHAPES
    if args.quick and cuda:
        shapes = [s for s in SHAPES if s[0] in ("q/o", "gate/up")]
    cases = [("decode", 64 if cuda else 16), ("prefill", 2048 if cuda else 32)]
    results, failed = [], False
    for kind, tokens in cases:
        for name, n_in, n_out in shapes:
            r = run_case(name, n_in, n_out, kind, tokens, dtype, device)
            ok = r["rel_err"] < (2e-2 if dtype == torch.bfloat16 else 1e-4)
            failed |= not ok
            results.append({**r, "ok": ok})
            print(f"{r['name']:16s} T={tokens:5d} triton {r['triton_us']:8.1f} us  torch {r['torch_us']:8.1f} us  "
                  f"base matmul {r['base_matmul_us']:8.1f} us  {r['triton_GBps']:7.1f} GB/s  rel err {r['rel_err']:.1e}"
                  f"{'' if ok else '  MISMATCH'}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)", "dtype": str(dtype),
                   "slots": NUM_SLOTS, "rank": RANK, "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
