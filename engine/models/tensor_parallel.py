"""What a model needs to know to run as one rank of a tensor-parallel group, and the arithmetic
of which rows of a checkpoint tensor a rank holds.

`TPContext` is passed explicitly to the model constructors (no global state): its ``group`` is a
`torch.distributed` process group object (engine/distributed builds it) or None at size 1.
Slicing (`take`) works on a plain tensor or on a lazily-read safetensors slice, so a rank reads
only its part of each large matrix from disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    """This process's place in the tensor-parallel group. Size 1 (the default) is the ordinary
    single-process model: nothing is split and no collective ever runs."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup (gloo on CPU, nccl on CUDA) when size > 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in a group of size {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("a tensor-parallel group of size > 1 needs a process group")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums `t` over the ranks in place (every rank gets the sum) and returns it."""
        self.group.allreduce([t]).wait()
        return t

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (equal shapes) concatenated along the last dim, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.group.allgather([parts], [t.contiguous()]).wait()
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Shard:
    """Rows [start, start + size) of a block of ``full`` rows: the part one rank holds."""

    start: int
    size: int
    full: int


def split(full: int, tp: TPContext, what: str) -> Shard:
    """An even split of `full` rows; ValueError naming `what` when it does not divide."""
    if full % tp.size:
        raise ValueError(f"{what} ({full}) must be divisible by tensor_parallel_size ({tp.size})")
    size = full // tp.size
    return Shard(tp.rank * size, size, full)


def head_shards(num_heads: int, num_kv_heads: int, head_dim: int, tp: TPContext) -> tuple[Shard, Shard]:
    """(query shard, key/value shard) in rows of the q and k (or v) projections. Query heads are
    split evenly. KV heads are split when there are at least as many as ranks; otherwise each
    rank holds one KV head, the one its query heads attend with (replicated over
    ``size / num_kv_heads`` ranks). ValueError names the count that does not fit."""
    q = split(num_heads, tp, "num_attention_heads")
    if num_kv_heads >= tp.size:
        kv = split(num_kv_heads, tp, "num_key_value_heads")
    elif tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp.size}) must be a multiple of num_key_value_heads "
                         f"({num_kv_heads}) when it exceeds it")
    else:
        kv = Shard(tp.rank // (tp.size // num_kv_heads), 1, num_kv_heads)
    return (Shard(q.start * head_dim, q.size * head_dim, num_heads * head_dim),
            Shard(kv.start * head_dim, kv.size * head_dim, num_kv_heads * head_dim))


def vocab_shard(vocab_size: int, tp: TPContext) -> Shard | None:
    """This rank's rows of a vocab-parallel LM head, or None where the head stays whole on every
    rank: at size 1, and when the vocabulary does not split evenly (GPT-2's 50257)."""
    if tp.size == 1 or vocab_size % tp.size:
        return None
    return split(vocab_size, tp, "vocab_size")


def shape_of(t: Any) -> list[int]:
    return list(t.shape) if isinstance(t, torch.Tensor) else list(t.get_shape())


def take(t: Any, dim: int, shard: Shard) -> torch.Tensor:
    """The shard's rows (dim 0) or columns (dim 1) of `t`, a tensor or a safetensors slice (only
    that part is read from the file)."""
    if shape_of(t)[dim] != shard.full:
        raise ValueError(f"expected {shard.full} along dim {dim}, got shape {tuple(shape_of(t))}")
    if isinstance(t, torch.Tensor):
        return t.narrow(dim, shard.start, shard.size)
    index = [slice(None)] * len(shape_of(t))
    index[dim] = slice(shard.start, shard.start + shard.size)
    return t[tuple(index)]


def materialize(t: Any) -> torch.Tensor:
    """`t` itself when a tensor; a lazily-read safetensors slice read whole."""
    return t if isinstance(t, torch.Tensor) else t[:]
