"""Per-step attention metadata: how the flat batch of tokens maps onto sequences and KV slots.

A step's batch is one flat list of T tokens belonging to B sequences. The model runner orders
the sequences so that every *decode* sequence (exactly one new token) comes first, followed by
the sequences that feed several tokens (prefill chunks). This lets backends treat the two groups
differently without per-token bookkeeping.

The KV cache of one layer is a tensor of shape ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values). Slot ``s`` is block ``s // block_size``, offset ``s % block_size``.

Invariants the runner guarantees (backends may rely on them):
  * ``query_start_loc[0] == 0`` and ``query_start_loc[-1] == num_tokens``.
  * For sequence i, its new tokens sit at positions ``seq_lens[i] - query_len_i ... seq_lens[i] - 1``;
    positions before that are already in the cache.
  * ``slot_mapping[t]`` is the slot where token t's K/V must be written; -1 marks a padded token
    whose K/V must not be written (used by CUDA-graph padding).
  * ``block_tables[i, j]`` is the j-th block of sequence i; entries past the sequence's last block
    are 0 (a valid block id, so unmasked loads never fault; backends mask by ``seq_lens``).
  * The first ``num_decodes`` sequences have query length 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    num_seqs: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [B + 1], on the model device
    seq_lens: torch.Tensor  # int32 [B], on the model device; context length after this step
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq], on the model device
    slot_mapping: torch.Tensor  # int64 [T], on the model device
    block_size: int
    # Host copies, so CPU code never has to synchronise with the device to read lengths.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Position of every new token (int64 [T]); the model takes it as its `positions` input.
    positions: torch.Tensor | None = None

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @staticmethod
    def build(
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        block_table_array: np.ndarray | None = None,
    ) -> "AttentionMetadata":
        """Builds metadata from host lists. Sequences must already be ordered decodes-first.

        The slot of token t of sequence i is computed from its position and the block table.
        ``block_table_array``, when given, is ``block_tables`` already laid out as a 0-padded
        int32 array (the runner's `BlockTableBuffer`), which saves re-copying every table.
        """
        num_seqs = len(query_lens)
        num_decodes = 0
        while num_decodes < num_seqs and query_lens[num_decodes] == 1:
            num_decodes += 1
        q = np.asarray(query_lens, dtype=np.int64)
        s = np.asarray(seq_lens, dtype=np.int64)
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q, out=qsl[1:])
        if block_table_array is not None:
            bt = block_table_array
        else:
            max_blocks = max((len(b) for b in block_tables), default=1) or 1
            bt = np.zeros((num_seqs, max_blocks), dtype=np.int32)
            for i, blocks in enumerate(block_tables):
                bt[i, : len(blocks)] = blocks
        # position of every new token, then slot = block_table[pos // bs] * bs + pos % bs
        seq_index = np.repeat(np.arange(num_seqs), q)
        positions = np.arange(int(qsl[-1])) - qsl[:-1][seq_index] + (s - q)[seq_index]
        slots = bt[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size
        return AttentionMetadata(
            num_tokens=int(qsl[-1]),
            num_seqs=num_seqs,
            num_decodes=num_decodes,
            max_query_len=int(q.max()) if num_seqs else 0,
            max_seq_len=int(s.max()) if num_seqs else 0,
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(device),
            seq_lens=torch.from_numpy(s.astype(np.int32)).to(device),
            block_tables=torch.from_numpy(np.ascontiguousarray(bt, dtype=np.int32)).to(device),
            slot_mapping=torch.from_numpy(slots).to(device),
            block_size=block_size,
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            positions=torch.from_numpy(positions).to(device),
        )
