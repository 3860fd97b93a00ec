"""A/B: the Q4_1 kernel (engine/kernels/q4_linear.py, straight from GGUF blocks) against the
float32 GEMM (engine/kernels/cpu_gemm.py, float32 panels of the dequantized weights), through
the engine's Python entries, 1 thread, cold weights, at decode batch sizes.

"Cold": SmolLM2-135M's linear shapes (qkv [960, 576], o [576, 576], gate_up [3072, 576],
down [576, 1536]) for 30 layers of distinct random weights, called in a forward pass's order, so
every weight comes from memory (425 MB as float32, 66 MB as Q4_1), as in a real decode step.
For each M the two kernels alternate within each round (order rotated); the table gives the
median over rounds of the CPU time (and wall) of one full 30-layer pass. Checks once per M that
the two give equal bits (they must: see q4_linear's docstring).

    nice -n 10 python -m benchmarks.q4_linear_ab [--rounds 5] [--ms 1,2,4,8,16,32] [--layers 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.kernels import cpu_gemm, q4_linear

SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536))


def random_q4_1(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random GGUF Q4_1 bytes [n, k/32 * 20]: random nibbles, d in [1e-3, 3e-2], m in [-0.2, 0]."""
    blocks = torch.randint(0, 256, (n, k // 32, 20), dtype=torch.uint8, generator=gen)
    d = (1e-3 + 2.9e-2 * torch.rand(n, k // 32, 1, generator=gen)).half()
    m = (-0.2 * torch.rand(n, k // 32, 1, generator=gen)).half()
    blocks[..., 0:2] = d.view(torch.uint8)
    blocks[..., 2:4] = m.view(torch.uint8)
    return blocks.reshape(n, -1)


def one_pass(run, layers, xs) -> tuple[float, float]:
    """(CPU s, wall s) of one forward pass's linears over all layers."""
    c0, t0 = time.process_time(), time.perf_counter()
    for layer in layers:
        for x, w in zip(xs, layer):
            run(x, w)
    return time.process_time() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ms", default="1,2,4,8,16,32")
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q4_layers, f32_layers = [], []
    for _ in range(args.layers):
        raws = [random_q4_1(n, k, gen) for _, n, k in SHAPES]
        q4_layers.append([q4_linear.pack_q4_1(r) for r in raws])
        f32_layers.append([cpu_gemm.pack(q4_linear.dequantize_q4_1(r), torch.float32) for r in raws])
    mb = lambda layers: sum(w.nbytes for layer in layers for w in layer) / 1e6  # noqa: E731
    print(f"{args.layers} layers, weights: Q4_1 {mb(q4_layers):.1f} MB, float32 {mb(f32_layers):.1f} MB; "
          f"1 thread, {args.rounds} rounds, median per full pass")
    impls = {"q4": (q4_layers, lambda x, w: q4_linear.linear(x, w)),
             "f32": (f32_layers, lambda x, w: cpu_gemm.linear(x, w, None))}
    print("| M | Q4_1 CPU ms | f32 CPU ms | Q4_1 wall ms | f32 wall ms | speed-up (CPU) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    crossover = None
    for m in [int(v) for v in args.ms.split(",")]:
        xs = [torch.randn(m, k, generator=gen) for _, _, k in SHAPES]
        for _, (layers, run) in impls.items():
            one_pass(run, layers, xs)  # warm code paths
        assert all(torch.equal(q4_linear.linear(x, q), cpu_gemm.linear(x, f, None))
                   for x, q, f in zip(xs, q4_layers[0], f32_layers[0])), "Q4_1 and float32 GEMM bits differ"
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in impls}
        names = list(impls)
        for r in range(args.rounds):
            for name in names[r % 2:] + names[:r % 2]:
                layers, run = impls[name]
                times[name].append(one_pass(run, layers, xs))
        med = {name: (statistics.median(c for c, _ in t) * 1e3, statistics.median(w for _, w in t) * 1e3)
               for name, t in times.items()}
        speedup = med["f32"][0] / med["q4"][0]
        if speedup < 1.0 and crossover is None:
            crossover = m
        print(f"| {m} | {med['q4'][0]:.2f} | {med['f32'][0]:.2f} | {med['q4'][1]:.2f} | {med['f32'][1]:.2f} "
              f"| {speedup:.2f}x |")
    print(f"crossover (first M where float32 is faster): {crossover if crossover else 'none in range'}")


if __name__ == "__main__":
    main()
