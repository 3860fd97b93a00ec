"""Probe: can a hand-written AVX2/FMA decode GEMM with its own packed weight layout and software
prefetch beat oneDNN's packed linear when the weights are cold (streamed from memory)?

An experiment, not an engine change: the kernel (benchmarks/csrc_probe/decode_gemm.cpp) is
built here with `torch.utils.cpp_extension.load` into a /tmp folder and used by nothing else.

What it checks and measures (1 thread, float32):
  * correctness of the probe kernel against a float64 F.linear reference (max abs / rel error,
    oneDNN's error alongside), and that a row's bits do not depend on M;
  * "hot": one layer's weight of one shape called again and again, ms per call and GFLOP/s;
  * "cold": a decode step's real order, 10 layers x (qkv, o, gate_up, down) with distinct
    weights, every call timed; ms per shape and per layer, GFLOP/s.
Implementations alternate within each round (>= 3 rounds, order rotated); medians are reported.

    nice -n 5 python benchmarks/decode_gemm_probe.py [--rounds 3] [--ms 1,8,16,32,64]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

SRC = Path(__file__).parent / "csrc_probe" / "decode_gemm.cpp"
BUILD = Path("/tmp/hc_decode_gemm_build")
LAYERS = 10
PF_LINES = (0, 16, 64, 256)  # prefetch distance in 64-byte lines: off, 1 KB, 4 KB, 16 KB


@dataclass(frozen=True)
class Model:
    name: str
    shapes: tuple[tuple[str, int, int], ...]  # (name, K in, N out)


MODELS = (
    Model("llama56m h512", (("qkv", 512, 1024), ("o", 512, 512), ("gate_up", 512, 3072), ("down", 1536, 512))),
    Model("smollm2 h576", (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))),
)


def build():
    BUILD.mkdir(parents=True, exist_ok=True)
    return load(name="hc_decode_gemm_probe", sources=[str(SRC)], build_directory=str(BUILD),
                extra_cflags=["-O3", "-march=native"], verbose=False)


def impls(ext):
    """name -> (pack(w) -> packed, run(x, packed, n) -> y)."""
    out = {"onednn": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None),
                      lambda x, p, n: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""))}
    for d in PF_LINES:
        out[f"hc pf{d * 64 // 1024}K" if d else "hc nopf"] = (
            ext.pack_weight, (lambda d: lambda x, p, n: ext.gemm(x, p, n, d))(d))
    return out


def check(ext) -> None:
    gen = torch.Generator().manual_seed(0)
    worst = {"hc": (0.0, 0.0), "onednn": (0.0, 0.0)}
    shapes = [s for m in MODELS for s in m.shapes] + [("odd", 100, 1000)]
    for _, k, n in shapes:
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        x64 = torch.randn(64, k, generator=gen)
        hp, op = ext.pack_weight(w), torch.ops.mkldnn._reorder_linear_weight(w, None)
        for m in (1, 5, 8, 16, 32, 64):
            x = x64[:m].contiguous()
            ref = F.linear(x.double(), w.double())
            for name, y in (("hc", ext.gemm(x, hp, n, 64)),
                            ("onednn", torch.ops.mkldnn._linear_pointwise(x, op, None, "none", [], ""))):
                err = (y.double() - ref).abs().max().item()
                rel = err / ref.abs().max().item()
                worst[name] = (max(worst[name][0], err), max(worst[name][1], rel))
            torch.testing.assert_close(ext.gemm(x, hp, n, 0), F.linear(x, w), rtol=1e-4, atol=1e-4)
        full = ext.gemm(x64, hp, n, 0)
        for m in (1, 5, 8, 16, 32):  # rows' bits independent of M and of prefetch
            assert torch.equal(ext.gemm(x64[:m].contiguous(), hp, n, 256), full[:m]), (k, n, m)
    for name, (err, rel) in worst.items():
        print(f"correctness {name:7s}: max abs err {err:.2e}, max rel err (to max |y|) {rel:.2e}")
    print("hc rows bitwise identical across M = 1..64 and prefetch settings: yes")


def hot(run, packed, x, n, target_s=0.04) -> float:
    """Seconds per call with one weight reused."""
    run(x, packed, n)
    reps, t = 4, 0.0
    while True:
        t0 = time.process_time()
        for _ in range(reps):
            run(x, packed, n)
        t = time.process_time() - t0
        if t >= target_s:
            return t / reps
        reps *= 2


def cold(run, layers, xs, shapes, sweeps=4) -> list[float]:
    """Seconds per call for each shape, the decode step's order over all layers' distinct weights."""
    tot = [0.0] * len(shapes)
    for sweep in range(sweeps + 1):
        for layer in layers:
            for i, (_, _, n) in enumerate(shapes):
                t0 = time.process_time_ns()
                run(xs[i], layer[i], n)
                if sweep:  # the first sweep warms code paths only
                    tot[i] += time.process_time_ns() - t0
    return [t / 1e9 / (sweeps * len(layers)) for t in tot]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ms", default="8,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ext = build()
    check(ext)
    ims = impls(ext)
    names = list(ims)
    gen = torch.Generator().manual_seed(1)
    for model in MODELS:
        ws = [[torch.randn(n, k, generator=gen) / k ** 0.5 for _, k, n in model.shapes] for _ in range(LAYERS)]
        packed = {name: [[ims[name][0](w) for w in layer] for layer in ws] for name in names}
        for m in [int(v) for v in args.ms.split(",")]:
            xs = [torch.randn(m, k, generator=gen) for _, k, _ in model.shapes]
            res = {(name, reg): [] for name in names for reg in ("hot", "cold")}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    run = ims[name][1]
                    res[(name, "hot")].append([hot(run, packed[name][0][i], xs[i], n)
                                               for i, (_, _, n) in enumerate(model.shapes)])
                    res[(name, "cold")].append(cold(run, packed[name], xs, model.shapes))
            report(model, m, names, res)


def report(model, m, names, res) -> None:
    flops = [2 * m * k * n for _, k, n in model.shapes]
    cols = " | ".join(f"{s} ms (GF/s)" for s, _, _ in model.shapes)
    print(f"\n{model.name}, M={m}, medians of rounds")
    print(f"| impl | regime | {cols} | layer ms (GF/s) |")
    print("| --- | --- |" + " ---: |" * (len(model.shapes) + 1))
    for reg in ("hot", "cold"):
        for name in names:
            per = [statistics.median(r[i] for r in res[(name, reg)]) for i in range(len(flops))]
            cells = " | ".join(f"{t * 1e3:.3f} ({f / t / 1e9:.0f})" for t, f in zip(per, flops))
            lay = sum(per)
            print(f"| {name} | {reg} | {cells} | {lay * 1e3:.3f} ({sum(flops) / lay / 1e9:.0f}) |")


if __name__ == "__main__":
    main()
