"""Linear layers on CPU straight from GGUF Q4_1 blocks (csrc/q4_1_gemm.cpp), for small batches.

Guarantees: `linear(x, pack(raw), b)` is bit-identical (torch.equal) to
`cpu_gemm.linear(x, cpu_gemm.pack(W), b)` with `W = gguf.dequantize(raw, Q4_1)`, for every M
and thread count, so each row's result is the same whatever other rows share the call: an
engine may run decode batches (small M) here and prefill (large M) through the float32 GEMM
without any request's output depending on the batch it ran in. How: each weight is rebuilt as
exactly gguf's float32 value fl(fl(d * q) + m) (one FMA, exact because d * q is: an 11-bit fp16
significand times a 4-bit code), then each output is one FMA chain over k = 0..K-1 from 0.0f
and one add of the bias, cpu_gemm's order (tests/test_q4_1_linear.py checks it).

Why: a decode step streams every weight from memory; Q4_1 is 5 bits a weight against float32's
32. 1 row: codes and d stay in registers, 8 weights cost and, shift, convert, FMA; 2-10 rows:
register tiles of <= 5 rows x 16 columns, 8 weights per and, convert, FMA (the nibble's 16^j
folded into a d * 16^-j table), shared by the tile's rows; 11+ rows: each panel decoded once per
64 rows into a float32 panel read by the float32 GEMM's own register tile. Software prefetch 4 KB
ahead (M = 4: ~20 % faster than without). benchmarks/q4_1_linear_ab.py (SmolLM2-135M's shapes,
30 layers of distinct weights, 1 thread, 2-core AMD EPYC AVX2, shared box, load 3.3-4;
benchmarks/RESULTS.md), CPU ms per 30-layer pass, float32 GEMM / this: M = 1: 24.2 / 8.8
(2.76x; 2.1-3.1x across runs as the float32 side's memory bandwidth varied), 2: 1.97x, 4: 1.45x,
6: 1.03x, 8: 1.19x, 12: 1.02x, 16: 1.01x, 32: 1.02x. No crossover up to M = 32, but from ~12 rows
the gain is nil, so callers may as well use the float32 GEMM there.

Layout (`pack`): uint8 [ceil(N / 32), K / 32, 640]: panels of 32 output rows, each a contiguous
stream of 640-byte blocks, one per 32 k: the 4 groups' 8 fp16 scales and 8 fp16 mins (128 bytes),
then per 8 k and group 32 bytes holding each row's 8 codes as the nibbles of one 32-bit lane (one
load gives 8 rows' codes at 8 k). Rows past N are zero blocks whose outputs are never stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.cpu_extension import cpu_ops_available

BLOCK_K = 32  # weights per Q4_1 block
BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


@dataclass(frozen=True)
class Q4_1Weight:
    """A Q4_1 weight [out_features, in_features] packed for `linear`."""

    packed: torch.Tensor  # uint8 [ceil(out / 32), in / 32, 640]
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


def unsupported_reason(device: torch.device) -> str | None:
    """None when `pack`/`linear` work on `device`; otherwise why not."""
    if device.type != "cpu":
        return f"the Q4_1 kernel runs on CPU only, not {device.type}"
    if not cpu_ops_available():
        return "the C++ CPU extension could not be built on this host"
    if not hasattr(torch.ops.conveyor_cpu, "q4_1_gemm"):
        return "this CPU has no AVX2 + FMA + F16C (the Q4_1 kernel was not compiled)"
    return None


def _check_available(device: torch.device) -> None:
    reason = unsupported_reason(device)
    if reason is not None:
        raise RuntimeError(f"Q4_1 kernel unavailable: {reason}")


def pack(raw: torch.Tensor) -> Q4_1Weight:
    """The GGUF Q4_1 tensor `raw` (uint8 [N, K / 32 * 20], as GGUFReader gives it) in the
    kernel's layout (a copy). ValueError naming the problem for a bad shape or dtype."""
    if not isinstance(raw, torch.Tensor):
        raise ValueError(f"raw must be a torch.Tensor, got {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw must be uint8 Q4_1 blocks, got {str(raw.dtype).removeprefix('torch.')}")
    if raw.dim() != 2 or raw.shape[0] == 0 or raw.shape[1] == 0 or raw.shape[1] % BLOCK_BYTES:
        raise ValueError(f"raw must be [N, K / 32 * 20] with N, K > 0 (20-byte blocks), got {list(raw.shape)}")
    _check_available(raw.device)
    n, k = int(raw.shape[0]), int(raw.shape[1]) // BLOCK_BYTES * BLOCK_K
    return Q4_1Weight(torch.ops.conveyor_cpu.q4_1_gemm_pack(raw.detach()), n, k)


def linear(x: torch.Tensor, w: Q4_1Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for float32 x [..., in_features]: float32 [..., out_features].
    ValueError naming the problem for a bad dtype or shape of x or bias."""
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x must be [..., {w.in_features}], got {list(x.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1 or bias.shape[0] != w.out_features):
        raise ValueError(f"bias must be float32 [{w.out_features}], got {str(bias.dtype).removeprefix('torch.')} "
                         f"{list(bias.shape)}")
    _check_available(x.device)
    x2 = x.reshape(-1, w.in_features)
    y = torch.ops.conveyor_cpu.q4_1_gemm(x2, w.packed, w.out_features, bias)
    return y.reshape(*x.shape[:-1], w.out_features)
