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

`--gate-up`: instead, the MLP of a layer (gate_up, SiLU-and-mul, down; llama56m's shapes, cold
as above, 1 thread) with SiLU-and-mul fused into the gate_up GEMM's epilogue
(cpu_gemm.silu_and_mul_linear on pack_gate_up panels) against the unfused path (cpu_gemm.linear
on pack panels, then ops.silu_and_mul), both with bf16-stored and float32 panels; checks that
the two give equal bits.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from engine.kernels import cpu_gemm, onednn_linear, ops

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


def gate_up_ab(ms: list[int], rounds: int) -> None:
    """Per-layer MLP time, fused SiLU epilogue vs unfused, medians of interleaved rounds."""
    hidden, inner = 512, 1536
    gen = torch.Generator().manual_seed(3)
    ws = [((torch.randn(2 * inner, hidden, generator=gen) / hidden ** 0.5).bfloat16().float(),
           (torch.randn(hidden, inner, generator=gen) / inner ** 0.5).bfloat16().float()) for _ in range(LAYERS)]

    def unfused(x, layer):
        return cpu_gemm.linear(ops.silu_and_mul(cpu_gemm.linear(x, layer[0], None)), layer[1], None)

    def fused(x, layer):
        return cpu_gemm.linear(cpu_gemm.silu_and_mul_linear(x, layer[0], None), layer[1], None)

    runs = {}
    for storage in (torch.bfloat16, torch.float32):
        tag = "bf16" if storage == torch.bfloat16 else "f32"
        down = [cpu_gemm.pack(wd, storage) for _, wd in ws]
        runs[f"unfused-{tag}"] = (unfused, [(cpu_gemm.pack(wg, storage), d) for (wg, _), d in zip(ws, down)])
        runs[f"fused-{tag}"] = (fused, [(cpu_gemm.pack_gate_up(wg, storage), d) for (wg, _), d in zip(ws, down)])
    names = list(runs)
    print("| M | " + " | ".join(f"{n} wall ms" for n in names) + " | " + " | ".join(f"{n} CPU ms" for n in names)
          + " | fused/unfused CPU, median of rounds, bf16 | f32 |")
    print("| ---: |" + " ---: |" * (2 * len(names) + 2))
    for m in ms:
        x = torch.randn(m, hidden, generator=gen)
        for tag in ("bf16", "f32"):
            a, b = (runs[f"{kind}-{tag}"] for kind in ("unfused", "fused"))
            assert torch.equal(a[0](x, a[1][0]), b[0](x, b[1][0])), (m, tag)
        sweeps = 4 if m <= 64 else 1
        res = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                fn, layers = runs[n]
                res[n].append(cold(fn, [[layer] for layer in layers], [x], sweeps))
        wall = {n: statistics.median(v[0][0] for v in res[n]) * 1e3 for n in names}
        cpu = {n: statistics.median(v[1] for v in res[n]) * 1e3 for n in names}
        # per-round CPU ratios (the two sides ran within the same round): steadier than a ratio of medians
        ratio = {tag: statistics.median(f[1] / u[1] for f, u in zip(res[f"fused-{tag}"], res[f"unfused-{tag}"]))
                 for tag in ("bf16", "f32")}
        print(f"| {m} | " + " | ".join(f"{wall[n]:.3f}" for n in names) + " | " + " | ".join(f"{cpu[n]:.3f}" for n in names)
              + f" | {ratio['bf16']:.3f} | {ratio['f32']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ms", default="1,8,32,256,2048")
    ap.add_argument("--models", default="llama56m,smollm2", help="which of: llama56m, smollm2")
    ap.add_argument("--gate-up", action="store_true", help="the fused SiLU epilogue A/B (see the docstring)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.gate_up:
        gate_up_ab([int(v) for v in args.ms.split(",")], args.rounds)
        return
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
