"""Attention backend interface and selection.

A backend computes attention for one layer over the paged KV cache. It is stateless apart from
its configuration, so one instance can serve every layer.
"""
from __future__ import annotations

from typing import Protocol

import torch

from engine.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Writes k/v of the new tokens into their slots, then attends each query to its
        sequence's context (cached prefix + new tokens, causal)."""
        ...


BACKENDS = ("torch", "triton", "cpu", "auto")


def get_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """`auto` picks Triton on CUDA; on CPU the C++ paged-attention kernel when it compiles on this
    host (first use builds it, ~30 s once; see `cpu_extension`), else the plain-torch path.
    `cpu` insists on the C++ kernel and raises if it cannot be built."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        else:
            from engine.kernels.cpu_extension import cpu_ops_available

            name = "cpu" if device.type == "cpu" and cpu_ops_available() else "torch"
    if name == "triton":
        from engine.kernels.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend 'cpu' runs on CPU tensors only, not on {device.type}")
        from engine.kernels.cpu_attention import CpuPagedAttentionBackend

        return CpuPagedAttentionBackend()
    from engine.kernels.torch_attention import TorchAttentionBackend

    return TorchAttentionBackend()
