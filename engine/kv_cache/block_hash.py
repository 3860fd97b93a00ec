"""Chained hashes that identify full KV blocks by their contents and everything before them.

The hash of block i covers the hash of block i-1, the token ids of block i, and (for the first
block) an optional salt. Two requests share a block only if every token up to the end of that
block is the same and their salts match, so tenants with different salts never share blocks.
The salt is any hashable: `Request.prefix_salt` combines the tenant's cache salt with the LoRA
adapter's uid, so requests of different adapters (or of an adapter and the base model) never
share KV, and requests of one adapter do.
"""
from __future__ import annotations

from collections.abc import Hashable

from engine.kv_cache.block_pool import BlockHash


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], salt: Hashable | None = None) -> BlockHash:
    return hash((parent, token_ids, salt if parent is None else None))


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: list[int], block_size: int, salt: Hashable | None = None
) -> None:
    """Appends the hashes of every full block of ``token_ids`` not yet hashed in ``hashes``."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), salt))
