"""CUDA graphs for decode steps.

A decode-only step (every sequence feeds exactly one token) of n sequences is padded up to the
nearest captured batch size and replayed from a graph captured at start-up, which removes the
per-kernel launch cost that dominates small-batch decode.

Guarantees:
  * A replay computes what the eager forward computes for the same n sequences; padded rows
    write no K/V (slot -1) and their outputs are dropped.
  * All inputs live in static device buffers that are refilled in place before each replay; the
    host-side ints the kernels use for launch grids are fixed at capture to values valid for
    every replay (max_seq_len = max_model_len).
"""
from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class CudaGraphRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int,
                 max_batch: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = [s for s in CAPTURE_SIZES if s < max_batch] + [max_batch]
        n = self.sizes[-1]
        max_blocks = cdiv(max_model_len, block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=bs, num_seqs=bs, num_decodes=bs, max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs], block_size=self.block_size,
            query_lens_cpu=[1] * bs, seq_lens_cpu=[self.max_model_len] * bs, positions=self.positions[:bs],
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)
            for _ in range(2):  # warm up: compiles kernels, settles the allocator
                self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_seqs and meta.num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replays the graph for a decode-only step; returns hidden states [n, hidden]."""
        n = meta.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if bs > n:  # padded rows: no K/V writes, a one-token context in block 0
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
            self.positions[n:bs].fill_(0)
            self.input_ids[n:bs].fill_(0)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
