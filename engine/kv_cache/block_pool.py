"""A fixed pool of KV-cache blocks with prefix-cache bookkeeping.

Every block is always in exactly one of two states:
  * in use: ``ref_cnt > 0``; owned by one or more requests; never evicted.
  * free: ``ref_cnt == 0``; sits in the free queue. A free block may still carry a hash, which
    keeps its contents findable for reuse until the block is handed out again (evicted).

The free queue is ordered least-recently-used first: new blocks are taken from its head, and
freed blocks are appended at its tail. Requests free their blocks tail-first, so a request's
last blocks are evicted before its first ones (its head is the part other requests share).
All operations are O(1) per block.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockHash = int


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # block_id -> Block, in eviction order (head first)
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, Block] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (free-but-cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    # -- state changes ---------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """Takes n blocks from the head of the free queue (evicting their cached contents).
        The caller must have checked that n <= num_free_blocks."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Adds a reference to blocks found in the prefix cache (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: list[Block]) -> None:
        """Drops one reference from each block, in the given order; blocks that reach zero
        join the tail of the free queue (so the first released is evicted first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache(self, block: Block, block_hash: BlockHash) -> None:
        """Registers a full block's contents under its hash. If another block already holds
        the same contents, the existing entry is kept (both stay valid; only one is findable)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)

    def uncache(self, block: Block) -> None:
        """Forgets a block's contents (its K/V was never written, e.g. its step failed), so no
        prefix lookup can find it. The block's references are unchanged."""
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def check_integrity(self) -> None:
        """Raises AssertionError if the pool's bookkeeping is inconsistent."""
        free_ids = set(self._free)
        assert len(free_ids) == len(self._free)
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"block {block.block_id} has ref_cnt {block.ref_cnt}"
            assert (block.ref_cnt == 0) == (block.block_id in free_ids), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but free={block.block_id in free_ids}"
            )
        for h, block in self._cached.items():
            assert block.block_hash == h, f"cached block {block.block_id} lost its hash"
