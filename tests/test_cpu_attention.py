"""The C++ CPU attention extension's K/V store (`write_kv_cache`) against `write_kv`, and the
kernel's two scoring paths (few rows: straight from the cache; many rows: the register-tiled
transposed-key path) giving the same bits and matching the torch reference.

The kernel's own reference tests (NaN-poisoned caches, many shapes, dtypes) are the CPU kernel
tests in tests/test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.kernels.torch_attention import TorchAttentionBackend, gather_slots, write_kv


def _ops():
    from engine.kernels.cpu_extension import cpu_ops_available

    if not cpu_ops_available():
        pytest.skip("the C++ CPU attention extension could not be built here (see the warning in the log)")
    return torch.ops.conveyor_cpu


@pytest.mark.parametrize("src,cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
def test_write_kv_cache_bit_exact_with_write_kv(src, cache_dtype, slot_dtype):
    """Strided k/v views of a fused projection, padding slots (-1) skipped, slots out of order,
    conversion to the cache dtype rounded as Tensor.to rounds: the same bytes as write_kv."""
    ops = _ops()
    gen = torch.Generator().manual_seed(0)
    num_blocks, block, kvh, d, t = 7, 16, 3, 36, 50
    cache = torch.randn(2, num_blocks, block, kvh, d, generator=gen).to(cache_dtype)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block, generator=gen)[:t]
    slots[[0, 9, 49]] = -1
    fused = (torch.randn(t, 2 * kvh + 2, d, generator=gen) * 3).to(src)
    k, v = fused[:, 1 : 1 + kvh], fused[:, 1 + kvh : 1 + 2 * kvh]
    write_kv(k, v, expected, slots)
    ops.write_kv_cache(k, v, cache, slots.to(slot_dtype))
    bits = torch.int32 if cache.element_size() == 4 else torch.int16
    assert torch.equal(cache.view(bits), expected.view(bits))  # the same bytes, NaN payloads included


def test_write_kv_cache_rejects_bad_inputs():
    ops = _ops()
    cache = torch.zeros(2, 4, 16, 2, 8)
    k = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="past the cache"):
        ops.write_kv_cache(k, k, cache, torch.tensor([0, 64, 1]))
    with pytest.raises(RuntimeError, match="slot_mapping"):
        ops.write_kv_cache(k, k, cache, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(RuntimeError, match="cache shape"):
        ops.write_kv_cache(torch.randn(3, 1, 8), torch.randn(3, 1, 8), cache, torch.tensor([0, 1, 2]))
    assert torch.equal(cache, torch.zeros_like(cache))  # nothing written by a refused call


def _run(ops, q, k, v, cache, table, bs, query_lens, seq_lens, rows, d):
    meta = AttentionMetadata.build(query_lens, seq_lens, [table] * len(query_lens), bs)
    meta.slot_mapping = torch.cat([gather_slots(torch.tensor(table, dtype=torch.int32), s, bs)[s - ql:]
                                   for ql, s in zip(query_lens, seq_lens)])
    ops.write_kv_cache(k[rows], v[rows], cache, meta.slot_mapping)
    out = torch.empty(len(rows), q.shape[1], d, dtype=q.dtype)
    ops.paged_attention(out, q[rows].contiguous(), cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, d**-0.5)
    return out, meta


@pytest.mark.parametrize("heads,kv_heads,d", [(2, 2, 36), (4, 2, 64), (9, 3, 80), (8, 1, 40)],
                         ids=["mha_d36", "gqa2_d64", "gqa3_d80", "gqa8_d40"])
def test_tiled_and_direct_paths_give_the_same_bits(heads, kv_heads, d):
    """A 150-token prefill (work items of many rows: the tiled path, row blocks of 6 and a
    remainder) against the same tokens as chunks of 1-7 tokens over the prefix (few rows: the
    direct path) and as one decode batch: bit-identical; and the prefill matches the torch
    reference. head_dims that are not multiples of 8 or 16 take every tail loop."""
    ops = _ops()
    bs, n = 16, 150
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(n, heads, d, generator=gen)
    k, v = (torch.randn(n, kv_heads, d, generator=gen) for _ in range(2))
    table = list(range(1, 1 + -(-n // bs)))[::-1]
    cache = torch.full((2, 1 + len(table), bs, kv_heads, d), float("nan"))
    full, meta = _run(ops, q, k, v, cache, table, bs, [n], [n], torch.arange(n), d)
    ref_cache = cache.nan_to_num(0.0)
    expected = TorchAttentionBackend().forward(q, k, v, ref_cache, meta, d**-0.5)
    torch.testing.assert_close(full, expected, atol=2e-4, rtol=2e-5)
    start = 0
    for size in (1, 2, 3, 5, 7, 4, 6, 1):
        start += 11
        chunk, _ = _run(ops, q, k, v, cache, table, bs, [size], [start + size], torch.arange(start, start + size), d)
        assert torch.equal(chunk, full[start : start + size]), f"chunk of {size} at {start}"
    toks = [0, 31, 32, 95, 96, 149]
    dec, _ = _run(ops, q, k, v, cache, table, bs, [1] * len(toks), [t + 1 for t in toks], torch.tensor(toks), d)
    assert torch.equal(dec, full[toks])
