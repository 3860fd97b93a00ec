"""Paged attention on CPU through the C++ kernel (`csrc/paged_attention.cpp`).

Prefill chunks and decodes go through one kernel call per layer that reads K/V blocks in place
through the block table: no padded copy of any context, no repeated K/V for GQA, float32
accumulation for float32, bfloat16 and float16 caches. `get_attention_backend` picks it for
`auto` on CPU when the extension compiled (`cpu_extension.cpu_ops_available`).
"""
from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata
from engine.kernels.cpu_extension import cpu_ops_available
from engine.kernels.torch_attention import write_kv


class CpuPagedAttentionBackend:
    """Guarantees the torch backend's results (to float rounding) for every batch the runner
    builds; raises RuntimeError at construction if the extension is unavailable."""

    name = "cpu"

    def __init__(self, op=None) -> None:
        """`op`: another build of the same kernel to call (benchmarks compare versions);
        torch.ops.conveyor_cpu.paged_attention by default."""
        if op is None and not cpu_ops_available():
            raise RuntimeError("the CPU attention extension could not be built (see the log); use attention_backend='torch'")
        self._op = op if op is not None else torch.ops.conveyor_cpu.paged_attention
        # the C++ K/V store (one pass, bit for bit write_kv's result); write_kv where a benchmark
        # passes another build's kernel on a host whose own extension did not build
        self._write = torch.ops.conveyor_cpu.write_kv_cache if cpu_ops_available() else write_kv

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._write(k, v, kv_cache, meta.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self._op(out, q, kv_cache, _int32(meta.block_tables), _int32(meta.seq_lens), _int32(meta.query_start_loc), scale)
        return out


def _int32(t: torch.Tensor) -> torch.Tensor:
    """The kernel reads metadata as contiguous int32 (what AttentionMetadata.build makes; a no-op then)."""
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()
