"""A/B: the engine's own AVX2 GEMM (engine/kernels/cpu_gemm.py, backend "cpu") with float32
panels ("cpu") and with bfloat16-stored panels ("cpu-bf16", exact: the weights are rounded to
bfloat16 first, as a bf16 checkpoint's are, for every implementation) against oneDNN's packed
linear (engine/kernels/onednn_linear.py, backend "onednn"), through the engine's own Python
entries (so per-call overhead counts), float32 compute, 1 thread, cold weights.

"Cold": a forward pass's real order, 10 layers x (qkv, o, gate_up, down) with distinct weights,
so each weight comes from memory, not cache. Rows M = 1, 8, 32 (decode), 256, 2048 (prefill
chunks). Implementations alternate within each round (order rotated); medians of rounds, wall
and this process's CPU time (a busy shared host inflates wall, less so CPU time). Also checks
each backend against F.linear once per shape, and that the two panel storages are bit-identical.

    nice -n 5 python -m benchmarks.cpu_gemm_ab [--rounds 3] [--ms 1,8,32,256,2048] [--models llama56m]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from engine.kernels import cpu_gemm, onednn_linear

LAYERS = 10
MODELS = (
    ("llama56m h512", (("qkv", 512, 1024), ("o", 512, 512), ("gate_up", 512, 3072), ("down", 1536, 512))),
    ("smollm2-135m h576", (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))),
)


def impls() -> dict:
    """name -> (pack(w), run(x, packed))."""
    out = {"onednn": (onednn_linear.pack, lambda x, p: onednn_linear.linear(x, p, None))}
    out["cpu"] = (lambda w: cpu_gemm.pack(w, torch.float32), lambda x, p: cpu_gemm.linear(x, p, None))
    out["cpu-bf16"] = (lambda w: cpu_gemm.pack(w, torch.bfloat16), lambda x, p: cpu_gemm.linear(x, p, None))
    return out


def cold(run, layers, xs, sweeps: int) -> tuple[list[float], float]:
    """(wall seconds per call for each shape, CPU seconds per layer), in a forward pass's order
    over all layers' weights."""
    tot = [0.0] * len(xs)
    cpu = 0.0
    for sweep in range(sweeps + 1):
        c0 = time.process_time()
        for layer in layers:
            for i, x in enumerate(xs):
                t0 = time.perf_counter_ns()
                run(x, layer[i])
                if sweep:  # the first sweep warms code paths (and oneDNN's primitive cache)
                    tot[i] += time.perf_counter_ns() - t0
        if sweep:
            cpu += time.process_time() - c0
    return [t / 1e9 / (sweeps * len(layers)) for t in tot], cpu / (sweeps * len(layers))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ms", default="1,8,32,256,2048")
    ap.add_argument("--models", default="llama56m,smollm2", help="which of: llama56m, smollm2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ims = impls()
    names = list(ims)
    gen = torch.Generator().manual_seed(1)
    print("| model | M | " + " | ".join(f"{s} onednn/cpu/cpu-bf16 ms" for s, _, _ in MODELS[0][1]) +
          " | layer wall ms onednn/cpu/cpu-bf16 | layer CPU ms onednn/cpu/cpu-bf16 | bf16 vs f32 panels wall (CPU) |")
    print("| --- | ---: |" + " ---: |" * (len(MODELS[0][1]) + 3))
    for model, shapes in MODELS:
        if not any(model.startswith(m) for m in args.models.split(",")):
            continue
        ws = [[(torch.randn(n, k, generator=gen) / k ** 0.5).bfloat16().float() for _, k, n in shapes]
              for _ in range(LAYERS)]
        packed = {name: [[ims[name][0](w) for w in layer] for layer in ws] for name in names}
        for m in [int(v) for v in args.ms.split(",")]:
            xs = [torch.randn(m, k, generator=gen) for _, k, _ in shapes]
            for i, x in enumerate(xs):
                ref = F.linear(x, ws[0][i])
                for name in names:
                    torch.testing.assert_close(ims[name][1](x, packed[name][0][i]), ref, rtol=1e-4, atol=1e-4)
                assert torch.equal(ims["cpu"][1](x, packed["cpu"][0][i]), ims["cpu-bf16"][1](x, packed["cpu-bf16"][0][i]))
            sweeps = 4 if m <= 64 else 1
            res = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    res[name].append(cold(ims[name][1], packed[name], xs, sweeps))
            med = {name: [statistics.median(r[0][i] for r in res[name]) for i in range(len(shapes))] for name in names}
            cpu = {name: statistics.median(r[1] for r in res[name]) for name in names}
            cells = " | ".join("/".join(f"{med[name][i] * 1e3:.3f}" for name in names) for i in range(len(shapes)))
            wall = {name: sum(med[name]) for name in names}
            print(f"| {model} | {m} | {cells} | " + "/".join(f"{wall[n] * 1e3:.3f}" for n in names) + " | "
                  + "/".join(f"{cpu[n] * 1e3:.3f}" for n in names)
                  + f" | {wall['cpu'] / wall['cpu-bf16']:.2f}x ({cpu['cpu'] / cpu['cpu-bf16']:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
