"""Megatron-style linear layers: column-parallel (output features split across ranks) and
row-parallel (input features split, partial outputs summed with an all-reduce).

Both are `nn.Linear` subclasses with the usual ``weight``/``bias`` parameters, so modules that
wrap projections by name (LoRA) and the weight loader see ordinary linears. At tensor-parallel
size 1 they hold the whole matrix and run exactly `F.linear`: the column-parallel class does not
override `forward` at all, the row-parallel one returns ``F.linear(x, weight, bias)`` after one
attribute test.

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

from engine.models.tensor_parallel import Shard, TPContext, materialize, take


class ColumnParallelLinear(nn.Linear):
    """y_local = x @ W_local^T (+ b_local): this rank's output features, no communication."""

    def __init__(self, in_features: int, blocks: list[Shard], bias: bool):
        super().__init__(in_features, sum(b.size for b in blocks), bias=bias)
        self.blocks = list(blocks)

    def shard(self, kind: str, tensor: Any, block: int = 0, transposed: bool = False) -> tuple[int, torch.Tensor]:
        """(first local row, this rank's rows) of fused block `block` from a checkpoint tensor
        (`kind` "weight" or "bias"; `transposed`: stored [in, out] as GPT-2's Conv1D)."""
        shard = self.blocks[block]
        row = sum(b.size for b in self.blocks[:block])
        if kind == "weight" and transposed:
            return row, materialize(take(tensor, 1, shard)).t()
        return row, materialize(take(tensor, 0, shard))


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: the input is this rank's slice of the features
    (the output of a column-parallel layer); the bias is held whole and added once, after the
    sum, so it is not counted once per rank."""

    def __init__(self, shard: Shard, out_features: int, bias: bool, tp: TPContext):
        super().__init__(shard.size, out_features, bias=bias)
        self.in_shard = shard
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out.add_(self.bias)

    def shard(self, kind: str, tensor: Any, transposed: bool = False) -> torch.Tensor:
        """This rank's columns of a checkpoint weight (the whole bias)."""
        if kind != "weight":
            return materialize(tensor)
        if transposed:
            return materialize(take(tensor, 0, self.in_shard)).t()
        return materialize(take(tensor, 1, self.in_shard))
