"""Triton kernel bodies for paged attention; `triton_attention.py` chooses tiles and launches them.

Layouts: q/out [T, H, D] (any token/head strides, unit dim stride); key/value cache
[num_blocks, block_size, KVH, D] (unit dim stride); block_tables [B, max_blocks] int32;
query_start_loc [B + 1] int32; seq_lens [B] int32; slot_mapping [T] int64.
Softmax runs in the log2 domain (exp2 with scale * log2(e)) in float32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,
    num_kv_heads, head_dim, block_size,
    KVH_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per token: copies all its KV heads to the slot; slot < 0 writes nothing."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, KVH_PAD)
    dims = tl.arange(0, BLOCK_D)
    head_ok = (heads < num_kv_heads) & (heads * 0 + slot >= 0)  # vector mask: padded tokens write nothing
    mask = head_ok[:, None] & (dims < head_dim)[None, :]
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_co
    dst = dst + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def paged_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    stride_qt, stride_qh,
    stride_cb, stride_co, stride_ch,
    stride_bt,
    out_ptr, stride_ot, stride_oh,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    scale, block_size, seq_start, seq_end, tok_offset, split_len, search_steps,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32: tl.constexpr,
):
    """Grid (programs, KVH, NUM_SPLITS). A program attends BLOCK_Q query tokens of one sequence
    for the GROUP query heads of KV head program_id(1): rows are (token, head) pairs.

    DECODE: program i is sequence seq_start + i (query length 1, BLOCK_Q == 1).
    Otherwise programs are laid flat over the query tiles of sequences [seq_start, seq_end):
    sequence i owns programs from (query_start_loc[i] - tok_offset) // BLOCK_Q + (i - seq_start)
    on, found by binary search; programs past a sequence's last tile exit at once.
    NUM_SPLITS > 1: split s covers context [s * split_len, (s + 1) * split_len) and writes
    unnormalised (acc, max, sum) to the partial buffers ([seqs, H, NUM_SPLITS, (D)], contiguous).
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = seq_start + pid
        q_block = 0
    else:
        lo = pid * 0 + seq_start  # a tensor, so the loop-carried type never changes
        hi = pid * 0 + seq_end
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            first = (tl.load(qsl_ptr + mid) - tok_offset) // BLOCK_Q + mid - seq_start
            right = first <= pid
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        seq = lo
        q_block = pid - ((tl.load(qsl_ptr + seq) - tok_offset) // BLOCK_Q + seq - seq_start)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len  # position of the sequence's first new token

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx_start + tok
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )

    # Keys past the last query of this tile are causally masked for every row: stop there.
    kv_hi = tl.minimum(seq_len, ctx_start + (q_block + 1) * BLOCK_Q)
    kv_lo = 0
    if NUM_SPLITS > 1:
        kv_lo = split * split_len
        kv_hi = tl.minimum(kv_hi, kv_lo + split_len)

    qk_scale = scale * 1.4426950408889634  # log2(e): softmax via exp2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_hi
        block = tl.load(bt_row + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % block_size) * stride_co + kv_head * stride_ch
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(key_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if FP32:  # fp32 models want fp32 accuracy, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # padded sequences: zeros, never NaN
        o = acc / l_safe[:, None]
        tl.store(
            out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            o.to(out_ptr.dtype.element_ty), mask=out_mask,
        )
    else:
        num_heads = tl.num_programs(1) * GROUP
        part = ((seq - seq_start).to(tl.int64) * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)


@triton.jit
def reduce_splits_kernel(
    out_ptr, stride_ot, stride_oh,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    head_dim,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (decodes, H): merges the split partials of one (sequence, head) into out."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    m = tl.load(part_max_ptr + base + splits, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + base + splits, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits have m = -inf and weigh nothing
    total = tl.sum(w * l, 0)
    total = tl.where(total == 0.0, 1.0, total)
    acc = tl.load(
        part_acc_ptr + (base + splits)[:, None] * head_dim + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    o = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=dim_ok)
