"""Linear layers on CPU through our own AVX2/FMA float32 GEMM (csrc/cpu_gemm.cpp), with each
weight packed once at load into 16-column panels.

Guarantees: `linear(x, pack(w), b)` equals `F.linear(x, w, b)` to float32 rounding (the sum is
one FMA chain per output in k order, then one add of the bias; BLAS and oneDNN sum in other
orders), and each row's result is bit-identical whatever other rows share the call (any M, any
thread count): a request's outputs do not depend on the batch it was scheduled in.

Why: on a 2-core AVX2 EPYC (1 thread) the kernel, with software prefetch of the weight stream,
measured faster than oneDNN's packed matmul with weights streamed from memory, and its entry
costs ~1 us against ~18 us for `torch.ops.mkldnn._linear_pointwise` (benchmarks/RESULTS.md,
benchmarks/cpu_gemm_ab.py). Needs the C++ extension built for an AVX2 + FMA host:
`unsupported_reason` says why not otherwise, and callers then use oneDNN or `F.linear`.

Storage: `pack` keeps the panels in bfloat16 (else float16) when every weight of the matrix is
exactly representable there, as weights loaded from a bf16 (or fp16) checkpoint are; the kernel
converts them back to the same float32 values before each FMA, so results are bit-identical to
float32 panels, with half the memory and half the weight traffic of a decode step (which streams
every weight from memory). Other weights (e.g. dequantized GGUF blocks) keep float32 panels.

MLP gate_up: `pack_gate_up` interleaves the gate and up panels so that `silu_and_mul_linear`
runs SiLU-and-mul in the GEMM's epilogue (csrc/cpu_gemm_gate_up.cpp), never writing the
[M, 2 * inner] intermediate, with the bits of `ops.silu_and_mul(linear(x, pack(w), b))`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.cpu_extension import cpu_ops_available

# Rows per block: every block streams the whole weight once; within a block a panel (K x 16)
# stays in L1/L2 for its row tiles. Measured by benchmarks/cpu_gemm_ab.py.
BLOCK_ROWS = 64


@dataclass(frozen=True)
class CpuPackedWeight:
    """A weight [out_features, in_features] packed for `linear` (panels [ceil(out/16), in, 16])."""

    panels: torch.Tensor  # float32, bfloat16 or float16: exact copies of the float32 weights
    out_features: int
    # From `pack_gate_up`: panel 2p holds gate columns 16p.., panel 2p+1 the same up columns
    gate_up: bool = False

    @property
    def nbytes(self) -> int:
        return self.panels.numel() * self.panels.element_size()


def unsupported_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """None when `pack`/`linear` work for weights of `dtype` on `device`; otherwise why not."""
    if device.type != "cpu":
        return f"the cpu GEMM runs on CPU only, not {device.type}"
    if dtype != torch.float32:
        return f"the cpu GEMM is float32 only, not {str(dtype).removeprefix('torch.')}"
    if not cpu_ops_available():
        return "the C++ CPU extension could not be built on this host"
    if not hasattr(torch.ops.conveyor_cpu, "cpu_gemm"):
        return "this CPU has no AVX2 + FMA (the cpu GEMM was not compiled)"
    return None


STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # tried in this order


def exact_in(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every float32 value of `weight` survives a round trip through `dtype` unchanged
    (NaNs and values out of range never do)."""
    if dtype == torch.float32:
        return True
    # The first row decides most weights (dequantized GGUF ones are rarely 16-bit exact) at a
    # fraction of the full round trip's cost (~1 CPU-s per load of the default model).
    head = weight.reshape(-1)[:4096]
    return torch.equal(head.to(dtype).float(), head) and torch.equal(weight.to(dtype).float(), weight)


def _storage(w: torch.Tensor, storage: torch.dtype | None) -> torch.dtype:
    """`storage`, or when None the first of bfloat16, float16, float32 holding `w` exactly; raises
    ValueError when an asked-for `storage` does not hold it, RuntimeError where the GEMM is unavailable."""
    reason = unsupported_reason(w.dtype, w.device)
    if reason is not None:
        raise RuntimeError(f"cpu GEMM unavailable: {reason}")
    for dtype in STORAGE_DTYPES if storage is None else (storage,) if storage in STORAGE_DTYPES else ():
        if exact_in(w, dtype):  # float32 always is: with storage None the loop always returns
            return dtype
    raise ValueError(f"cpu GEMM storage {storage} does not hold these float32 weights exactly")


def pack(weight: torch.Tensor, storage: torch.dtype | None = None) -> CpuPackedWeight:
    """The [out, in] float32 weight in the kernel's panel layout (a copy), stored in `storage`,
    or when None in the first of bfloat16, float16, float32 that holds every weight exactly.
    Raises ValueError when an asked-for `storage` does not hold the weights exactly, and
    RuntimeError where `unsupported_reason` is not None."""
    w = weight.detach()
    dtype = _storage(w, storage)
    return CpuPackedWeight(torch.ops.conveyor_cpu.cpu_gemm_pack(w.to(dtype)), int(w.shape[0]))


def pack_gate_up(weight: torch.Tensor, storage: torch.dtype | None = None) -> CpuPackedWeight:
    """An MLP's fused [gate; up] weight [2 * inner, in] packed for `silu_and_mul_linear` (and
    `linear`, which gives the same [.., 2 * inner] as `pack`'s layout): gate and up panels
    interleaved, one storage for both (chosen as `pack` does). ValueError for an odd row count."""
    w = weight.detach()
    if w.dim() != 2 or w.shape[0] % 2:
        raise ValueError(f"gate_up weight must be [2 * inner, in], got {list(w.shape)}")
    dtype, inner = _storage(w, storage), w.shape[0] // 2
    gate, up = (torch.ops.conveyor_cpu.cpu_gemm_pack(half.to(dtype)) for half in (w[:inner], w[inner:]))
    return CpuPackedWeight(torch.stack((gate, up), 1).flatten(0, 1), int(w.shape[0]), gate_up=True)


def _rows(x: torch.Tensor, width: int, run) -> torch.Tensor:
    """run(x2) on x [..., in] as 2-D rows, the result [..., width]."""
    if x.dim() == 2:
        return run(x)
    return run(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], width)


def linear(x: torch.Tensor, packed: CpuPackedWeight, bias: torch.Tensor | None,
           block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """x @ W^T (+ bias) for float32 x [..., in], with W packed by `pack` or `pack_gate_up`."""
    n = packed.out_features
    if packed.gate_up:
        return _rows(x, n, lambda x2: torch.ops.conveyor_cpu.cpu_gemm_gate_up(x2, packed.panels, n // 2, bias, False,
                                                                             block_rows))
    return _rows(x, n, lambda x2: torch.ops.conveyor_cpu.cpu_gemm(x2, packed.panels, n, bias, block_rows))


def silu_and_mul_linear(x: torch.Tensor, packed: CpuPackedWeight, bias: torch.Tensor | None,
                        block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """silu(gate) * up of h = x @ [Wg; Wu]^T (+ bias), [..., inner], W packed by `pack_gate_up`,
    without the [..., 2 * inner] intermediate: bit-identical to `ops.silu_and_mul(linear(x, ..))`
    for float32 x (csrc/cpu_gemm_gate_up.cpp)."""
    if not packed.gate_up:
        raise ValueError("silu_and_mul_linear needs a weight packed by pack_gate_up")
    inner = packed.out_features // 2
    return _rows(x, inner, lambda x2: torch.ops.conveyor_cpu.cpu_gemm_gate_up(x2, packed.panels, inner, bias, True,
                                                                             block_rows))
