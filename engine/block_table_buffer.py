"""The runner's persistent block tables: one preallocated int32 row per running sequence,
updated with deltas.

A sequence's block table only grows while it runs (the KV cache manager appends to the same
list in place), so re-copying every table into a fresh array each step costs O(batch x context
blocks) of Python-to-array conversion per step for no new information. This buffer keeps each
sequence's row across steps and writes only the block ids appended since the last step.

Guarantees: ``rows(...)`` returns, for the given sequences in the given order, an int32 array
whose row i starts with exactly ``block_ids[i]`` and is 0-padded to ``max(len) `` columns (what
`AttentionMetadata` requires). A table that is a new list object (the sequence was preempted
and re-admitted, or the id was reused) or got shorter is rewritten in full, so a stale row is
never read. Rows of sequences absent from a step are released.
"""
from __future__ import annotations

import numpy as np


class BlockTableBuffer:
    def __init__(self, num_rows: int = 64, num_cols: int = 64):
        self._table = np.zeros((max(num_rows, 1), max(num_cols, 1)), dtype=np.int32)
        self._row_of: dict[str, int] = {}  # sequence id -> row
        self._src: dict[str, list[int]] = {}  # the list each row mirrors (identity checked)
        self._written: dict[str, int] = {}  # ids of that list already in the row
        self._free = list(range(self._table.shape[0] - 1, -1, -1))

    def rows(self, seq_ids: list[str], block_ids: list[list[int]]) -> np.ndarray:
        """The block tables of this step's sequences as one [B, max_blocks] int32 array."""
        self._release_absent(seq_ids)
        width = max((len(b) for b in block_ids), default=1) or 1
        if width > self._table.shape[1]:
            self._grow(self._table.shape[0], max(width, 2 * self._table.shape[1]))
        index = np.empty(len(seq_ids), dtype=np.int64)
        for i, (sid, ids) in enumerate(zip(seq_ids, block_ids)):
            row = self._row_of.get(sid)
            if row is None:
                row = self._take_row()
                self._row_of[sid] = row
                self._src[sid], self._written[sid] = ids, 0
            elif self._src[sid] is not ids or len(ids) < self._written[sid]:
                self._src[sid], self._written[sid] = ids, 0
            done, n = self._written[sid], len(ids)
            if n > done:
                self._table[row, done:n] = ids[done:n]
                self._written[sid] = n
            index[i] = row
        out = self._table[index, :width]  # a copy: later writes cannot change this step's tables
        # columns past a row's own blocks may hold ids from a longer earlier occupant: zero them
        lens = np.fromiter((len(b) for b in block_ids), dtype=np.int64, count=len(block_ids))
        out[np.arange(width)[None, :] >= lens[:, None]] = 0
        return out

    def _release_absent(self, seq_ids: list[str]) -> None:
        if len(self._row_of) <= len(seq_ids) and all(s in self._row_of for s in seq_ids):
            return  # the common decode step: the same sequences as before
        present = set(seq_ids)
        for sid in [s for s in self._row_of if s not in present]:
            self._free.append(self._row_of.pop(sid))
            del self._src[sid], self._written[sid]

    def _take_row(self) -> int:
        if not self._free:
            old = self._table.shape[0]
            self._grow(2 * old, self._table.shape[1])
            self._free.extend(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def _grow(self, num_rows: int, num_cols: int) -> None:
        table = np.zeros((num_rows, num_cols), dtype=np.int32)
        table[: self._table.shape[0], : self._table.shape[1]] = self._table
        self._table = table
