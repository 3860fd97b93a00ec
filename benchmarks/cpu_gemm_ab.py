"""A/B: the engine's own AVX2 GEMM (engine/kernels/cpu_gemm.py, backend "cpu") against oneDNN's
packed linear (engine/kernels/onednn_linear.py, backend "onednn"), through the engine's own
Python entries (so per-call overhead counts), float32, 1 thread, cold weights.

"Cold": a forward pass's real order, 10 layers x (qkv, o, gate_up, down) with distinct weights,
so each weight comes from memory, not cache. Rows M = 1, 8, 32, 64 (decode), 256, 2048 (prefill
chunks). Implementations alternate within each round (order rotated); medians of rounds.
Also checks each backend against F.linear once per shape.

    nice -n 5 python -m benchmarks.cpu_gemm_ab [--rounds 3] [--ms 1,8,32,64,256,2048]
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
    out["cpu"] = (cpu_gemm.pack, lambda x, p: cpu_gemm.linear(x, p, None))
    return out


def cold(run, layers, xs, sweeps: int) -> list[float]:
    """Seconds per call for each shape, in a forward pass's order over all layers' weights."""
    tot = [0.0] * len(xs)
    for sweep in range(sweeps + 1):
        for layer in layers:
            for i, x in enumerate(xs):
                t0 = time.perf_counter_ns()
                run(x, layer[i])
                if sweep:  # the first sweep warms code paths (and oneDNN's primitive cache)
                    tot[i] += time.perf_counter_ns() - t0
    return [t / 1e9 / (sweeps * len(layers)) for t in tot]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ms", default="1,8,32,64,256,2048")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ims = impls()
    names = list(ims)
    gen = torch.Generator().manual_seed(1)
    print("| model | M | " + " | ".join(f"{s} onednn/cpu ms" for s, _, _ in MODELS[0][1]) +
          " | layer onednn ms | layer cpu ms | cpu speedup |")
    print("| --- | ---: |" + " ---: |" * (len(MODELS[0][1]) + 3))
    for model, shapes in MODELS:
        ws = [[torch.randn(n, k, generator=gen) / k ** 0.5 for _, k, n in shapes] for _ in range(LAYERS)]
        packed = {name: [[ims[name][0](w) for w in layer] for layer in ws] for name in names}
        for m in [int(v) for v in args.ms.split(",")]:
            xs = [torch.randn(m, k, generator=gen) for _, k, _ in shapes]
            for i, x in enumerate(xs):
                ref = F.linear(x, ws[0][i])
                for name in names:
                    torch.testing.assert_close(ims[name][1](x, packed[name][0][i]), ref, rtol=1e-4, atol=1e-4)
            sweeps = 4 if m <= 64 else 1
            res = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % 2:] + names[:r % 2]:
                    res[name].append(cold(ims[name][1], packed[name], xs, sweeps))
            med = {name: [statistics.median(r[i] for r in res[name]) for i in range(len(shapes))] for name in names}
            cells = " | ".join(f"{a * 1e3:.3f}/{b * 1e3:.3f}" for a, b in zip(med["onednn"], med["cpu"]))
            lo, lc = sum(med["onednn"]), sum(med["cpu"])
            print(f"| {model} | {m} | {cells} | {lo * 1e3:.3f} | {lc * 1e3:.3f} | {lo / lc:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
