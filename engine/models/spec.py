"""What the KV cache manager needs to know about a model's attention layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the paged KV cache a model reads and writes.

    Each of the ``num_layers`` layers owns one tensor
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (keys, then values).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Cache bytes one token occupies across all layers (keys and values)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def layer_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's cache tensor."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)
