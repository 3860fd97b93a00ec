"""Maps requests to KV blocks: allocation, prefix-cache lookup, and release.

The manager knows requests only by id; callers hand it the token ids (and cache salt) it needs
to hash blocks, so it depends on nothing above it.

Guarantees:
  * A request's block table covers positions ``0 .. num_computed + num_new - 1`` after a
    successful ``allocate_slots``.
  * Blocks of a request that hold only known tokens (prompt or generated) and are full are
    registered in the prefix cache as soon as they are allocated for those tokens; their K/V is
    written in the same step, before any attention reads it. If that step fails, ``free`` with
    ``num_valid_tokens`` unregisters them again.
  * ``allocate_slots`` either succeeds completely or changes nothing.
  * After ``free``, the request owns no blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.kv_cache.block_hash import extend_block_hashes
from engine.kv_cache.block_pool import Block, BlockHash, BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self._blocks: dict[str, list[Block]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as ids, kept in step
        self._num_cached: dict[str, int] = {}  # leading blocks of the request already registered
        # Hashes of each request's full blocks, extended as its tokens grow. Kept across a
        # preemption (the tokens do not change), dropped when the request is freed for good.
        self._hashes: dict[str, list[BlockHash]] = {}
        # Counters in tokens, cumulative (prefix-cache hit rate = hits / queries).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table. The list is the manager's own (no copy per step): read
        it, never change it; it grows in place when the request gets more blocks."""
        ids = self._block_ids.get(request_id)
        return [] if ids is None else ids

    def tracked_requests(self) -> set[str]:
        """Ids of the requests the manager holds any state for (blocks or hashes)."""
        return set(self._blocks) | set(self._hashes)

    def _block_hashes(self, request_id: str, token_ids: Sequence[int], salt: str | None) -> list[BlockHash]:
        hashes = self._hashes.setdefault(request_id, [])
        extend_block_hashes(hashes, token_ids, self.block_size, salt)
        return hashes

    def find_cached_prefix(self, request_id: str, token_ids: Sequence[int], salt: str | None = None) -> list[Block]:
        """Leading full blocks of ``token_ids`` found in the cache. At least the last token is
        always left out, so the step that finishes the prompt has logits to sample."""
        if not self.enable_caching:
            return []
        hashes = self._block_hashes(request_id, token_ids, salt)
        max_blocks = (len(token_ids) - 1) // self.block_size
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

    def allocate_slots(self, request_id: str, token_ids: Sequence[int], num_computed: int, num_new_tokens: int,
                       cached_prefix: Sequence[Block] = (), salt: str | None = None) -> bool:
        """Makes room for ``num_new_tokens`` more tokens after the request's ``num_computed``
        ones (and after ``cached_prefix``, blocks found by ``find_cached_prefix`` for a request
        being admitted). ``token_ids`` are all the request's known tokens. Returns False,
        changing nothing, if there are not enough free blocks."""
        blocks = self._blocks.setdefault(request_id, [])
        ids = self._block_ids.setdefault(request_id, [])
        num_computed += len(cached_prefix) * self.block_size
        need = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(cached_prefix)
        # Cached blocks that are currently free leave the free list when we take them.
        revived = sum(1 for b in cached_prefix if b.ref_cnt == 0)
        if need + revived > self.pool.num_free_blocks:
            if not blocks:
                del self._blocks[request_id], self._block_ids[request_id]
            return False
        if cached_prefix:
            self.pool.touch(list(cached_prefix))
            blocks.extend(cached_prefix)
            ids.extend(b.block_id for b in cached_prefix)
            self._num_cached[request_id] = len(blocks)
        if need > 0:
            new = self.pool.allocate(need)
            blocks.extend(new)
            ids.extend(b.block_id for b in new)
        self._cache_full_blocks(request_id, token_ids, salt, blocks, num_computed + num_new_tokens)
        return True

    def _cache_full_blocks(self, request_id: str, token_ids: Sequence[int], salt: str | None,
                           blocks: list[Block], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        start = self._num_cached.get(request_id, 0)
        num_full = min(num_tokens, len(token_ids)) // self.block_size
        if num_full <= start:
            return
        hashes = self._block_hashes(request_id, token_ids, salt)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self._num_cached[request_id] = num_full

    def free(self, request_id: str, *, keep_hashes: bool = False, num_valid_tokens: int | None = None) -> None:
        """Releases every block of the request, tail first (so its tail is evicted first).

        ``keep_hashes`` keeps the request's block hashes for its return (preemption).
        ``num_valid_tokens``: only the first that many tokens have K/V actually written (a step
        failed); blocks past them are removed from the prefix cache before release."""
        blocks = self._blocks.pop(request_id, [])
        self._block_ids.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if not keep_hashes:
            self._hashes.pop(request_id, None)
        if num_valid_tokens is not None:
            for block in blocks[num_valid_tokens // self.block_size:]:
                self.pool.uncache(block)
        self.pool.release(list(reversed(blocks)))

    def is_idle(self) -> bool:
        """O(1): True when no request holds blocks or hashes and every block is free. What must
        hold whenever the engine has no unfinished request."""
        return (not self._blocks and not self._block_ids and not self._hashes
                and self.pool.num_free_blocks == self.pool.num_blocks)

    def check_integrity(self) -> None:
        """Raises AssertionError unless: free + in-use == total, every in-use block's ref_cnt
        equals the number of requests holding it, and no request holds a block twice."""
        self.pool.check_integrity()
        holders: dict[int, int] = {}
        assert set(self._block_ids) == set(self._blocks), "block id tables out of step"
        for rid, blocks in self._blocks.items():
            ids = [b.block_id for b in blocks]
            assert ids == self._block_ids.get(rid), f"request {rid}: block id table out of step"
            assert len(ids) == len(set(ids)), f"request {rid} holds a block twice"
            for i in ids:
                holders[i] = holders.get(i, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} != holders {holders.get(block.block_id, 0)}"
            )
        in_use = sum(1 for b in self.pool.blocks if b.ref_cnt > 0)
        assert in_use + self.pool.num_free_blocks == self.pool.num_blocks
