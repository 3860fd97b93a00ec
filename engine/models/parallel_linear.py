"""Megatron-style linear layers: column-parallel (output features split across ranks) and
row-parallel (input features split, partial outputs summed with an all-reduce).

Both are `nn.Linear` subclasses with the usual ``weight``/``bias`` parameters, so modules that
wrap projections by name (LoRA) and the weight loader see ordinary linears. At tensor-parallel
size 1 they hold the whole matrix and run exactly `F.linear`, or, once `prepack_linears`
(engine/models/prepack.py) has given them a ``packed`` weight, oneDNN's or our own CPU GEMM on it (the
dense ``weight`` is then a meta tensor: shape and dtype only).

A column-parallel layer can be a fusion of several checkpoint projections (q/k/v, gate/up):
``blocks`` gives, per fused projection, which rows of it this rank holds (`Shard`); the rank's
weight is those row-blocks stacked in order. Checkpoint tensors are sliced with `take`, which
reads only the rank's part of a lazily-opened safetensors tensor.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_gemm, onednn_linear, q4_linear
from engine.kernels.ops import silu_and_mul
from engine.models.tensor_parallel import Shard, TPContext, materialize, take


class PackableLinear(nn.Linear):
    """`nn.Linear` whose weight may be replaced by a packed copy (``packed``): oneDNN's (an
    mkldnn tensor) or the cpu GEMM's (`cpu_gemm.CpuPackedWeight`), or by Q4_1 blocks (``q4``)."""

    packed: torch.Tensor | cpu_gemm.CpuPackedWeight | None = None
    # Instead of ``packed``: the checkpoint's own Q4_1 blocks (engine/models/gguf_q4_1.py), with
    # the bits the float32 panels of the dequantized weight would give, at 5 bits a weight.
    q4: q4_linear.Q4Weight | None = None

    def local(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T (+ bias) with this rank's weight, packed or dense."""
        if self.q4 is not None:
            return q4_linear.linear(x, self.q4, bias)
        if isinstance(self.packed, cpu_gemm.CpuPackedWeight):
            return cpu_gemm.linear(x, self.packed, bias)
        if self.packed is not None:
            return onednn_linear.linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)

    def pack_cpu(self) -> cpu_gemm.CpuPackedWeight:
        """This rank's weight packed for the cpu GEMM (engine/models/prepack.py calls it)."""
        return cpu_gemm.pack(self.weight)


class ColumnParallelLinear(PackableLinear):
    """y_local = x @ W_local^T (+ b_local): this rank's output features, no communication."""

    def __init__(self, in_features: int, blocks: list[Shard], bias: bool):
        super().__init__(in_features, sum(b.size for b in blocks), bias=bias)
        self.blocks = list(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x, self.bias)

    def shard(self, kind: str, tensor: Any, block: int = 0, transposed: bool = False) -> tuple[int, torch.Tensor]:
        """(first local row, this rank's rows) of fused block `block` from a checkpoint tensor
        (`kind` "weight" or "bias"; `transposed`: stored [in, out] as GPT-2's Conv1D)."""
        shard = self.blocks[block]
        row = sum(b.size for b in self.blocks[:block])
        if kind == "weight" and transposed:
            return row, materialize(take(tensor, 1, shard)).t()
        return row, materialize(take(tensor, 0, shard))


class GateUpLinear(ColumnParallelLinear):
    """An MLP's gate and up projections fused ([gate | up], ``inner`` columns each on this rank),
    whose output only feeds SiLU-and-multiply. With cpu GEMM panels and at least
    ``FUSED_MIN_ROWS`` rows, `silu_and_mul_forward` fuses it into the GEMM's epilogue
    (cpu_gemm.silu_and_mul_linear: bit-identical, no [rows, 2 * inner] intermediate); otherwise
    it is `silu_and_mul(self(x))`. Tensor parallel shards fuse alike: each rank's gate and up
    columns are the same slice of the intermediate features."""

    # Fewest rows for the fused epilogue: measured not slower at 1-2,048 rows
    # (benchmarks/cpu_gemm_ab.py --gate-up, benchmarks/RESULTS.md)
    FUSED_MIN_ROWS = 1

    def __init__(self, in_features: int, inner: Shard, bias: bool):
        super().__init__(in_features, [inner, inner], bias=bias)

    def pack_cpu(self) -> cpu_gemm.CpuPackedWeight:
        return cpu_gemm.pack_gate_up(self.weight)

    def silu_and_mul_forward(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this layer's output, [..., inner]."""
        packed = self.packed
        if self.q4 is not None:
            return silu_and_mul(self.local(x, self.bias))  # the fused epilogue's bits, unfused
        if (isinstance(packed, cpu_gemm.CpuPackedWeight) and packed.gate_up and x.dtype == torch.float32
                and x.numel() >= self.FUSED_MIN_ROWS * x.shape[-1]):
            return cpu_gemm.silu_and_mul_linear(x, packed, self.bias)
        return silu_and_mul(self(x))


class RowParallelLinear(PackableLinear):
    """y = all_reduce(x_local @ W_local^T) + b: the input is this rank's slice of the features
    (the output of a column-parallel layer); the bias is held whole and added once, after the
    sum, so it is not counted once per rank."""

    def __init__(self, shard: Shard, out_features: int, bias: bool, tp: TPContext):
        super().__init__(shard.size, out_features, bias=bias)
        self.in_shard = shard
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.local(x, self.bias)
        out = self.tp.all_reduce(self.local(x, None))
        return out if self.bias is None else out.add_(self.bias)

    def shard(self, kind: str, tensor: Any, transposed: bool = False) -> torch.Tensor:
        """This rank's columns of a checkpoint weight (the whole bias)."""
        if kind != "weight":
            return materialize(tensor)
        if transposed:
            return materialize(take(tensor, 0, self.in_shard)).t()
        return materialize(take(tensor, 1, self.in_shard))
