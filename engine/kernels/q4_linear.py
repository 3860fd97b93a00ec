"""Linear layers on CPU straight from GGUF Q4_1 blocks (csrc/q4_gemm.cpp), for small batches.

GGUF Q4_1: a weight [N, K] (K a multiple of 32) is N rows of K/32 blocks of 20 bytes: fp16 d,
fp16 m, 16 bytes qs; weight j < 16 of a block is (qs[j] & 0xF) * d + m, weight j + 16 is
(qs[j] >> 4) * d + m. `pack_q4_1` takes those bytes as uint8 [N, K/32 * 20].

Guarantees:
* `dequantize_q4_1(raw)` is bit-equal to `gguf.dequantize(raw, Q4_1)` (float32 d * q, exact,
  then one rounding of + m).
* `linear(x, pack_q4_1(raw), b)` is bit-identical to the float32 GEMM on the dequantized weight,
  `cpu_gemm.linear(x, cpu_gemm.pack(dequantize_q4_1(raw)), b)`: the kernel forms each weight as
  fma(q, d, m), which is exactly dequantize's value (q * d is exact: 11 by 4 significant bits),
  and sums each output as one FMA chain over k = 0..K-1 from 0.0f, as that GEMM does. Hence
  (a) against F.linear(x, W) (another summation order) and the exact product of x and the
  dequantized W: |linear - x·W_n| <= γ_K Σ_k |x_k W_nk| with γ_K = K u / (1 - K u), u = 2^-24,
  so |linear - F.linear| <= 2 γ_K Σ_k |x_k W_nk| (tests/test_q4_linear.py checks this bound);
  (b) each row's bits are the same whatever other rows share the call, any M, any thread count,
  and the same as the float32 GEMM's: a caller switching kernels at a batch-size threshold keeps
  its outputs batch-invariant; (c) any M >= 0, any N, non-contiguous x (copied), bias optional
  (added after the chain: one rounding, as the float32 GEMM and F.linear's addmm do).

Why: a decode step of SmolLM2-135M streams every linear weight from memory: ~425 MB as float32
against ~66 MB as Q4_1 (5 bits a weight). On a 2-core AVX2 EPYC, 1 thread, 30 layers' cold
weights (benchmarks/q4_linear_ab.py, benchmarks/RESULTS.md), one pass of the linears took
10.5 ms here against 17.8-29.8 ms for the float32 GEMM at M = 1 (1.6-2.8x, the float32 side
varies with the box's memory traffic), 1.46x at M = 4, 1.14x at 8, 1.04x at 32, 1.02x at 256:
no crossover measured. 1-4 rows decode weights in registers once per tile; 5+ rows decode each
panel once into a float32 buffer read by the float32 GEMM's register tile (cpu_gemm_tile.h).

Layout (`Q4Weight.packed`, uint8 [ceil(N/16), K/32, 320]): panels of 16 output columns, each a
contiguous stream of 320-byte blocks: fp16 d[16], fp16 m[16], then for each of the block's 32 k,
8 bytes whose byte j holds column j's nibble (low) and column j + 8's (high). Same 5 bits a weight
as GGUF; columns past N are zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.cpu_extension import cpu_ops_available

BLOCK = 32  # weights per Q4_1 block (along in_features)
BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


@dataclass(frozen=True)
class Q4Weight:
    """A Q4_1 weight [out_features, in_features] packed for `linear`."""

    packed: torch.Tensor  # uint8 [ceil(out / 16), in / 32, 320]
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


def unsupported_reason(device: torch.device) -> str | None:
    """None when `pack_q4_1`/`linear` work on `device`; otherwise why not."""
    if device.type != "cpu":
        return f"the Q4_1 kernel runs on CPU only, not {device.type}"
    if not cpu_ops_available():
        return "the C++ CPU extension could not be built on this host"
    if not hasattr(torch.ops.conveyor_cpu, "q4_1_linear"):
        return "the loaded C++ CPU extension has no q4_1_linear op (a build from older sources)"
    return None


def _check_raw(raw: torch.Tensor) -> int:
    """in_features of GGUF Q4_1 bytes `raw`; ValueError naming what is wrong with them."""
    if raw.dtype != torch.uint8:
        raise ValueError(f"Q4_1 raw bytes must be uint8, got {raw.dtype}")
    if raw.dim() != 2:
        raise ValueError(f"Q4_1 raw bytes must be 2-D [out, in / 32 * 20], got shape {list(raw.shape)}")
    if raw.shape[1] == 0 or raw.shape[1] % BLOCK_BYTES:
        raise ValueError(f"Q4_1 raw bytes: row width {raw.shape[1]} is not a positive multiple of "
                         f"{BLOCK_BYTES} (one block per 32 inputs)")
    return raw.shape[1] // BLOCK_BYTES * BLOCK


def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] of GGUF Q4_1 bytes [N, K/32 * 20]; bit-equal to gguf.dequantize."""
    k = _check_raw(raw)
    blocks = raw.reshape(raw.shape[0], -1, BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [N, K/32, 1]
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    qs = blocks[..., 4:]
    q = torch.cat((qs & 0xF, qs >> 4), dim=-1).float()  # weights j, then j + 16
    return (d * q + m).reshape(raw.shape[0], k)  # d * q exact; + m rounds once, as gguf's


def pack_q4_1(raw: torch.Tensor) -> Q4Weight:
    """GGUF Q4_1 bytes uint8 [N, K/32 * 20] (CPU) packed for `linear`. ValueError for a bad shape
    or dtype, RuntimeError where `unsupported_reason` is not None."""
    k = _check_raw(raw)
    reason = unsupported_reason(raw.device)
    if reason is not None:
        raise RuntimeError(f"Q4_1 kernel unavailable: {reason}")
    return Q4Weight(torch.ops.conveyor_cpu.q4_1_pack(raw.detach()), int(raw.shape[0]), k)


def linear(x: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for float32 x [..., in_features]: [..., out_features] (see the module doc)."""
    if x.dtype != torch.float32:
        raise ValueError(f"Q4_1 linear takes float32 x, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"Q4_1 linear: x has {x.shape[-1]} features, the weight takes {w.in_features}")
    x2 = x.reshape(-1, w.in_features)
    y = torch.ops.conveyor_cpu.q4_1_linear(x2, w.packed, w.out_features, w.in_features)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*x.shape[:-1], w.out_features)
