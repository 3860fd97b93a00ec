"""Multi-LoRA shrink and expand in Triton: the CUDA path of `lora_ops.add_lora` (also runs under
TRITON_INTERPRET=1 on CPU, which is how the tests check it without a GPU).

The scheme is Punica's: a batch whose tokens use different adapters is computed as a
segmented gathered matmul (SGMV) in two steps,
  * shrink: v[t] = A[slot[t]] @ x[t]       -> v [T, R] in float32 (R = slot rank, small)
  * expand: y[t] += scaling[slot[t]] * (B[slot[t]] @ v[t]), in place in y (a view is fine)
Tokens are grouped by slot on the device: `make_segments` sorts token indices by slot (slot -1
last, never launched) and counts each slot's tokens. Each program owns BLOCK_M tokens of one
slot's segment and one tile of the output columns, so a prefill segment of one adapter uses
tensor-core tiles (SGMV) and a decode batch degenerates to gathered rows (BGMV-like); programs
past the end of their segment return at once. Launch grids use only host ints (T, S, dims),
so nothing synchronises with the device and the calls are safe under CUDA-graph capture.

Rounding: products accumulate in float32; v is kept in float32 and cast to the weights' dtype
for the expand matmul, the same point where the torch path rounds it. float32 inputs use IEEE
dots (no TF32) so the float32 path matches the torch path closely.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Segments:
    """Tokens grouped by slot, on the device. order[seg_start[s] : seg_start[s] + seg_len[s]]
    are the indices of the tokens of slot s, ascending; slot -1 tokens sort after every slot."""

    order: torch.Tensor  # [T] int32
    seg_start: torch.Tensor  # [S] int32
    seg_len: torch.Tensor  # [S] int32


def make_segments(token_slots: torch.Tensor, num_slots: int) -> Segments:
    """Groups tokens by slot without a host sync (scatter_add_ counts, not bincount, which
    synchronises on CUDA). Slots must lie in [-1, num_slots)."""
    slots = token_slots.long()
    key = torch.where(slots < 0, torch.full_like(slots, num_slots), slots)
    order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slots.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    return Segments(order, starts[:num_slots].to(torch.int32), counts[:num_slots].to(torch.int32))


@triton.jit
def _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, slot, pid_m, BLOCK_M: tl.constexpr):
    """Token indices (int64) of rows pid_m*BLOCK_M.. of slot's segment, their mask, and whether
    the block lies past the segment's end."""
    n = tl.load(seg_len_ptr + slot)
    start = tl.load(seg_start_ptr + slot)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < n
    tok = tl.load(order_ptr + start + rows, mask=ok, other=0).to(tl.int64)
    return tok, ok, pid_m * BLOCK_M >= n


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    stride_xt, stride_as, stride_ar, stride_vt,
    in_dim, rank,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    slot = tl.program_id(0)
    tok, row_ok, past_end = _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, slot, tl.program_id(1), BLOCK_M)
    if past_end:
        return
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        xb = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # A[slot] is [R, in]; the tile is read transposed as [BLOCK_K, BLOCK_R]
        ab = tl.load(a_base + r[None, :] * stride_ar + k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xb, ab, input_precision="ieee")
        else:
            acc += tl.dot(xb, ab)
    tl.store(v_ptr + tok[:, None] * stride_vt + r[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    v_ptr, b_ptr, y_ptr, scaling_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
    stride_vt, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    out_dim, rank,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    slot = tl.program_id(0)
    tok, row_ok, past_end = _segment_rows(order_ptr, seg_start_ptr, seg_len_ptr, slot, tl.program_id(1), BLOCK_M)
    if past_end:
        return
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_dim
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        vb = tl.load(v_ptr + tok[:, None] * stride_vt + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        vb = vb.to(b_ptr.dtype.element_ty)  # the torch path's rounding point
        # B[slot] is [out, R]; the tile is read transposed as [BLOCK_R, BLOCK_N]
        bb = tl.load(b_base + cols[None, :] * stride_bn + r[:, None] * stride_br,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(vb, bb, input_precision="ieee")
        else:
            acc += tl.dot(vb, bb)
    scale = tl.load(scaling_ptr + slot).to(tl.float32)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + cols[None, :] * stride_yn
    ok = row_ok[:, None] & col_ok[None, :]
    old = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (old + scale * acc).to(y_ptr.dtype.element_ty), mask=ok)


def _block_m(num_tokens: int) -> int:
    # tl.dot needs tiles of at least 16; bigger tiles only pay off for prefill-sized segments
    return 16 if num_tokens <= 256 else 64


def _block_r(rank: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rank)))


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, segments: Segments | None = None
) -> torch.Tensor:
    """v[t] = lora_a[token_slots[t]] @ x[t] as float32 [T, R]; rows of slot -1 are zero."""
    num_tokens, in_dim = x.shape
    num_slots, rank = lora_a.shape[:2]
    if x.stride(1) != 1:
        x = x.contiguous()
    lora_a = lora_a.to(x.dtype)
    if lora_a.stride(2) != 1:
        lora_a = lora_a.contiguous()
    v = torch.zeros((num_tokens, rank), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_slots == 0 or rank == 0:
        return v
    seg = segments if segments is not None else make_segments(token_slots, num_slots)
    block_m, block_r = _block_m(num_tokens), _block_r(rank)
    grid = (num_slots, triton.cdiv(num_tokens, block_m), triton.cdiv(rank, block_r))
    _shrink_kernel[grid](
        x, lora_a, v, seg.order, seg.seg_start, seg.seg_len,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), v.stride(0),
        in_dim, rank,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, IEEE=x.dtype == torch.float32,
    )
    return v


def lora_expand(
    y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
    scaling: torch.Tensor, segments: Segments | None = None,
) -> None:
    """y[t] += scaling[s] * (lora_b[s] @ v[t]) in place for t with s = token_slots[t] >= 0.
    y may be a strided view (a column slice of a fused output)."""
    num_tokens, out_dim = y.shape
    num_slots, _, rank = lora_b.shape
    if num_tokens == 0 or num_slots == 0 or rank == 0 or out_dim == 0:
        return
    lora_b = lora_b.to(y.dtype)  # any strides: [S, out, R] contiguous or a view of [S, R, out]
    if v.stride(1) != 1:
        v = v.contiguous()
    seg = segments if segments is not None else make_segments(token_slots, num_slots)
    block_m, block_n = _block_m(num_tokens), 64
    grid = (num_slots, triton.cdiv(num_tokens, block_m), triton.cdiv(out_dim, block_n))
    _expand_kernel[grid](
        v, lora_b, y, scaling, seg.order, seg.seg_start, seg.seg_len,
        v.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        out_dim, rank,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(rank), IEEE=y.dtype == torch.float32,
    )


def add_lora(y, x, lora_a, lora_b, token_slots, scaling) -> None:
    """`lora_ops.add_lora` on the device: shrink then expand, sharing one segment grouping
    (the step's, when token_slots is a `LoRAMapping` that carries one)."""
    seg = getattr(token_slots, "segments", None)
    token_slots = getattr(token_slots, "token_slots", token_slots)
    if seg is None:
        seg = make_segments(token_slots, lora_a.shape[0])
    v = lora_shrink(x, lora_a, token_slots, seg)
    lora_expand(y, v, lora_b, token_slots, scaling, seg)
