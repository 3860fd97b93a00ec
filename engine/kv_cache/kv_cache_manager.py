"""Maps requests to KV blocks: allocation, prefix-cache lookup, and release.

Guarantees:
  * A request's block table covers positions ``0 .. num_computed_tokens + scheduled - 1``.
  * Blocks of a request that hold only tokens known to the request (prompt or generated) and are
    full are registered in the prefix cache as soon as they are allocated for those tokens; their
    K/V is written in the same step, before any attention reads it.
  * ``allocate_slots`` either succeeds completely or changes nothing.
  * After ``free``, the request owns no blocks.
"""
from __future__ import annotations

from engine.kv_cache.block_pool import Block, BlockPool
from engine.scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self._blocks: dict[str, list[Block]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks of the request already registered
        # Counters in tokens, cumulative (prefix-cache hit rate = hits / queries).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """Leading full blocks of the request's tokens found in the cache. At least the last
        token is always left out, so the step that finishes the prompt has logits to sample."""
        if not self.enable_caching:
            return []
        hashes = request.update_block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_queried: int, num_hit: int) -> None:
        self.prefix_cache_queries += num_queried
        self.prefix_cache_hits += num_hit

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_prefix: list[Block] = ()) -> bool:
        """Makes room for ``num_new_tokens`` more tokens after the request's computed ones (and
        after ``cached_prefix``, blocks found by ``find_cached_prefix`` for a request being
        admitted). Returns False, changing nothing, if there are not enough free blocks."""
        blocks = self._blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        need = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(cached_prefix)
        # Cached blocks that are currently free leave the free list when we take them.
        revived = sum(1 for b in cached_prefix if b.ref_cnt == 0)
        if need + revived > self.pool.num_free_blocks:
            if not blocks:
                del self._blocks[request.request_id]
            return False
        if cached_prefix:
            self.pool.touch(list(cached_prefix))
            blocks.extend(cached_prefix)
            self._num_cached[request.request_id] = len(blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[Block], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        start = self._num_cached.get(request.request_id, 0)
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full <= start:
            return
        hashes = request.update_block_hashes(self.block_size)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self._num_cached[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Releases every block of the request, tail first (so its tail is evicted first)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.release(list(reversed(blocks)))

    def check_integrity(self) -> None:
        """Raises AssertionError unless: free + in-use == total, every in-use block's ref_cnt
        equals the number of requests holding it, and no request holds a block twice."""
        self.pool.check_integrity()
        holders: dict[int, int] = {}
        for rid, blocks in self._blocks.items():
            ids = [b.block_id for b in blocks]
            assert len(ids) == len(set(ids)), f"request {rid} holds a block twice"
            for i in ids:
                holders[i] = holders.get(i, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} != holders {holders.get(block.block_id, 0)}"
            )
        in_use = sum(1 for b in self.pool.blocks if b.ref_cnt > 0)
        assert in_use + self.pool.num_free_blocks == self.pool.num_blocks
