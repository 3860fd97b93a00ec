"""Paged attention in Triton: the CUDA fast path (also runs under TRITON_INTERPRET=1 on CPU).

Same semantics as `torch_attention.TorchAttentionBackend`: write the new tokens' K/V into their
slots (skipping slot -1), then attend every query to its sequence's context, causally.

Kernels (the Triton bodies live in `triton_attention_kernels.py`):
  * `store_kv_kernel`: one program per token, scatters K and V into the paged cache.
  * `paged_attention_kernel`: ONE kernel for prefill, chunked prefill with a cached prefix and
    decode. A program owns a tile of queries of one sequence and all query heads of one KV head
    (GQA: every K/V tile is loaded once per KV group), walks the context through the block table
    with an online softmax in float32, and stops at the causal frontier of its last query.
  * split-KV decode: when few decode sequences would leave most SMs idle, the same kernel runs
    with the context cut into splits that write partial (acc, max, sum) results, and
    `reduce_splits_kernel` merges them.

Launch grids come only from host ints in the metadata (`num_seqs`, `num_decodes`, `num_tokens`,
`max_seq_len`), so forward never synchronises with the device. Under CUDA-graph capture the
caller must pass metadata whose host ints are upper bounds valid for every replay (see
`TritonAttentionBackend.forward`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from engine.attention_metadata import AttentionMetadata
from engine.kernels.triton_attention_kernels import (
    paged_attention_kernel,
    reduce_splits_kernel,
    store_kv_kernel,
)


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of one paged-attention launch. block_m counts rows = query tokens x group heads."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Writes k[t], v[t] ([T, KVH, D]) to slot slot_mapping[t] of kv_cache; slot -1 is skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if kv_cache.stride(4) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("kv_cache, k and v must be contiguous in head_dim")
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    store_kv_kernel[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        num_kv_heads, head_dim, kv_cache.shape[2],
        KVH_PAD=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


class TritonAttentionBackend:
    """Paged attention with Triton kernels.

    Tuning knobs (the defaults suit an H100/H200; tests shrink them to exercise every path):
      max_kv_splits: upper bound on splits of one decode context (1 disables split-KV).
      min_tokens_per_split: a split is never shorter than this many context tokens.
      target_programs: split-KV is used when decode programs (decodes x KV heads) are fewer than
        this; None means 2 x the device's SM count.
    """

    name = "triton"

    def __init__(
        self,
        max_kv_splits: int = 32,
        min_tokens_per_split: int = 256,
        target_programs: int | None = None,
    ) -> None:
        if max_kv_splits < 1:
            raise ValueError(f"max_kv_splits must be >= 1, got {max_kv_splits}")
        if min_tokens_per_split < 1:
            raise ValueError(f"min_tokens_per_split must be >= 1, got {min_tokens_per_split}")
        self.max_kv_splits = max_kv_splits
        self.min_tokens_per_split = min_tokens_per_split
        self.target_programs = target_programs

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D], kv_cache [2, NB, BS, KVH, D] -> [T, H, D].

        Host ints used for grids: num_tokens, num_seqs, num_decodes, max_seq_len. For CUDA-graph
        replay they must be fixed at capture: max_seq_len as the longest context any replay may
        have (e.g. max_model_len); padded sequences may have query length 0 or seq_len 0.
        """
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[3]
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if q.stride(2) != 1:
            raise ValueError("q must be contiguous in head_dim")
        store_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if num_tokens == 0:
            return out
        nd = meta.num_decodes
        if nd:
            self._decode(q, kv_cache, meta, scale, out)
        if meta.num_seqs > nd:
            self._prefill(q, kv_cache, meta, scale, out)
        return out

    # -- launches -------------------------------------------------------------------------

    def _common_args(self, q, kv_cache, meta):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        return (
            q, key_cache, value_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            q.stride(0), q.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            meta.block_tables.stride(0),
        )

    def _prefill(self, q, kv_cache, meta, scale, out) -> None:
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = kv_cache.shape[3]
        group = num_heads // num_kv_heads
        nd = meta.num_decodes
        cfg = _prefill_tiles(q, head_dim, group)
        block_q = max(1, cfg.block_m // group)
        # Program b of the flat grid belongs to the last sequence i with
        # (query_start_loc[i] - nd) // block_q + (i - nd) <= b; this bound covers every tile.
        num_programs = (meta.num_tokens - nd) // block_q + (meta.num_seqs - nd)
        grid = (num_programs, num_kv_heads, 1)
        paged_attention_kernel[grid](
            *self._common_args(q, kv_cache, meta),
            out, out.stride(0), out.stride(1),
            out, out, out,  # split-KV buffers: unused
            scale, meta.block_size, nd, meta.num_seqs, nd, 0,
            (meta.num_seqs - nd).bit_length(),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
            DECODE=False, NUM_SPLITS=1, FP32=q.dtype == torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def _decode(self, q, kv_cache, meta, scale, out) -> None:
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = kv_cache.shape[3]
        group = num_heads // num_kv_heads
        nd = meta.num_decodes
        cfg = _decode_tiles(q, head_dim, group)
        num_splits = self._num_splits(nd * num_kv_heads, meta.max_seq_len, q.device)
        # Context tokens per split, a multiple of the KV tile so splits never share a tile.
        split_len = triton.cdiv(triton.cdiv(max(meta.max_seq_len, 1), num_splits), cfg.block_n) * cfg.block_n
        common = dict(
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_M=cfg.block_m, BLOCK_Q=1, BLOCK_N=cfg.block_n, DECODE=True,
            FP32=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        grid = (nd, num_kv_heads, num_splits)
        if num_splits == 1:
            paged_attention_kernel[grid](
                *self._common_args(q, kv_cache, meta),
                out, out.stride(0), out.stride(1),
                out, out, out,
                scale, meta.block_size, 0, nd, 0, split_len, 0,
                NUM_SPLITS=1, **common,
            )
            return
        part_acc = torch.empty((nd, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty((nd, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        paged_attention_kernel[grid](
            *self._common_args(q, kv_cache, meta),
            out, out.stride(0), out.stride(1),
            part_acc, part_max, part_sum,
            scale, meta.block_size, 0, nd, 0, split_len, 0,
            NUM_SPLITS=num_splits, **common,
        )
        reduce_splits_kernel[(nd, num_heads)](
            out, out.stride(0), out.stride(1),
            part_acc, part_max, part_sum,
            head_dim, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )

    def _num_splits(self, decode_programs: int, max_seq_len: int, device: torch.device) -> int:
        """How many KV splits fill the device without making splits shorter than the minimum."""
        target = self.target_programs
        if target is None:
            target = 2 * _sm_count(device)
        if decode_programs >= target or self.max_kv_splits == 1:
            return 1
        by_length = max(1, max_seq_len // self.min_tokens_per_split)
        by_occupancy = triton.cdiv(target, decode_programs)
        return max(1, min(self.max_kv_splits, by_length, by_occupancy))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: pretend a small device so the split path gets exercised


def _prefill_tiles(q: torch.Tensor, head_dim: int, group: int) -> TileConfig:
    if not q.is_cuda:  # interpreter: big tiles mean fewer (slow) interpreted iterations
        return TileConfig(block_m=max(32, triton.next_power_of_2(group)), block_n=32, num_warps=4, num_stages=1)
    if q.dtype == torch.float32 or head_dim > 128:
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def _decode_tiles(q: torch.Tensor, head_dim: int, group: int) -> TileConfig:
    block_m = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    if not q.is_cuda:
        return TileConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=1)
    if q.dtype == torch.float32 or head_dim > 128:
        return TileConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=2)
    return TileConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=3)
