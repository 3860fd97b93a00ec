"""A/B: the Q4_1 kernel (engine/kernels/q4_1_linear.py, weights read straight from GGUF Q4_1
blocks) against the float32 GEMM (engine/kernels/cpu_gemm.py) on the same weights dequantized
by gguf, as the engine loads them today, through the engines' Python entries, 1 thread.

SmolLM2-135M's linear shapes (qkv [960, 576], o [576, 576], gate_up [3072, 576], down
[576, 1536]), 30 layers of distinct random Q4_1 weights: one pass is a decode step's real order
over every layer's weights, so each weight comes from memory (cold), not cache. Rows M = 1, 2,
4, 8, 16, 32. Per round and M the two kernels alternate (order rotated); each measurement is
this process's CPU time (time.process_time) per 30-layer pass over `--passes` passes, after one
warm-up pass; the table shows medians over rounds, and the speed-up float32 / Q4_1. Also checks
once per M that the two give equal bits (torch.equal), the guarantee the engine relies on.

Also, where built, the other bit-identical Q4_1 kernel (engine/kernels/q4_linear.py, 16-column
panels, 5+ rows decoded into a float32 buffer) as a third column, "q4_linear", same protocol.

    nice -n 10 python -m benchmarks.q4_1_linear_ab [--rounds 3] [--passes 5] [--ms 1,2,4,8,16,32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import gguf
import numpy as np
import torch

from engine.kernels import cpu_gemm, q4_1_linear, q4_linear

LAYERS = 30
SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536))  # (name, N, K)


def random_q4_1(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Q4_1 blocks [n, k / 32 * 20] with random codes and a model-like fp16 scale and min."""
    blocks = k // 32
    raw = np.empty((n, blocks, 20), np.uint8)
    raw[..., 0:2] = rng.uniform(1e-3, 3e-2, (n, blocks)).astype(np.float16).view(np.uint8).reshape(n, blocks, 2)
    raw[..., 2:4] = rng.uniform(-0.2, 0.0, (n, blocks)).astype(np.float16).view(np.uint8).reshape(n, blocks, 2)
    raw[..., 4:] = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    return raw.reshape(n, blocks * 20)


RUN = {"q4_1": lambda x, w: q4_1_linear.linear(x, w), "f32": lambda x, w: cpu_gemm.linear(x, w, None)}
if q4_linear.unsupported_reason(torch.device("cpu")) is None:
    RUN["q4_linear"] = lambda x, w: q4_linear.linear(x, w)


def build(layers: int, seed: int = 0):
    """{name: [[packed weight per shape] per layer]} for each kernel of RUN."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in RUN}
    for _ in range(layers):
        raws = [torch.from_numpy(random_q4_1(n, k, rng)) for _, n, k in SHAPES]
        out["q4_1"].append([q4_1_linear.pack(r) for r in raws])
        out["f32"].append([cpu_gemm.pack(torch.from_numpy(gguf.dequantize(r.numpy(), gguf.GGMLQuantizationType.Q4_1)
                                                          .copy()), torch.float32) for r in raws])
        if "q4_linear" in out:
            out["q4_linear"].append([q4_linear.pack_q4_1(r) for r in raws])
    return out


def one_pass(name: str, weights, xs) -> None:
    run = RUN[name]
    for layer in weights[name]:
        for x, w in zip(xs, layer):
            run(x, w)


def measure(name: str, weights, xs, passes: int) -> float:
    """CPU seconds per 30-layer pass (after a warm-up pass)."""
    one_pass(name, weights, xs)
    c0 = time.process_time()
    for _ in range(passes):
        one_pass(name, weights, xs)
    return (time.process_time() - c0) / passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--ms", default="1,2,4,8,16,32")
    ap.add_argument("--layers", type=int, default=LAYERS)
    args = ap.parse_args()
    reason = q4_1_linear.unsupported_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"Q4_1 kernel unavailable: {reason}")
    torch.set_num_threads(1)
    ms = [int(m) for m in args.ms.split(",")]
    weights = build(args.layers)
    mb = {name: sum(w.nbytes for layer in weights[name] for w in layer) / 2**20 for name in RUN}
    print(f"{args.layers} layers, MiB of weights streamed per pass: "
          + ", ".join(f"{name} {size:.0f}" for name, size in mb.items()))
    gen = torch.Generator().manual_seed(1)
    xs_by_m = {m: [torch.randn(m, k, generator=gen) for _, _, k in SHAPES] for m in ms}
    for m in ms:  # the guarantee, once per M, on layer 0
        for i, x in enumerate(xs_by_m[m]):
            ref = RUN["f32"](x, weights["f32"][0][i])
            for name in RUN:
                assert torch.equal(RUN[name](x, weights[name][0][i]), ref), f"{name} not bit-identical at M={m}"
    times = {(name, m): [] for name in RUN for m in ms}
    for rnd in range(args.rounds):
        for i, m in enumerate(ms):
            names = list(RUN)
            order = names[(rnd + i) % len(names):] + names[:(rnd + i) % len(names)]  # rotated
            for name in order:
                times[name, m].append(measure(name, weights, xs_by_m[m], args.passes))
    other = "q4_linear" in RUN
    print("| M | f32 GEMM ms/pass | Q4_1 ms/pass | speed-up (f32 / Q4_1) |" + (" q4_linear ms/pass | f32 / q4_linear |" if other else ""))
    print("| ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if other else ""))
    crossover = None
    for m in ms:
        f, q = (statistics.median(times[name, m]) * 1e3 for name in ("f32", "q4_1"))
        if crossover is None and q >= f:
            crossover = m
        row = f"| {m} | {f:.2f} | {q:.2f} | {f / q:.2f}x |"
        if other:
            o = statistics.median(times["q4_linear", m]) * 1e3
            row += f" {o:.2f} | {f / o:.2f}x |"
        print(row)
    print("crossover: " + (f"Q4_1 no faster from M = {crossover}" if crossover else f"none up to M = {ms[-1]}"))


if __name__ == "__main__":
    main()
