"""Triton versions of the fused ops in `ops.py` (rms_norm, apply_rotary, silu_and_mul).

Each function has the same signature and result as its `*_torch` twin in `ops.py`, including
where that twin rounds to the tensor dtype, so outputs agree to the last bit or nearly so.
Rows are processed one per program; a whole row fits in one tile for hidden sizes used by
LLMs (the tile is the next power of two of the row length).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    stride_x, stride_res, stride_out, stride_new_res,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the activation dtype first, exactly like `x + residual` in torch
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual); with residual None the second is x."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        new_res = torch.empty_like(x2)
    else:
        res2 = new_res = x2  # unused by the kernel
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, new_res,
            x2.stride(0), res2.stride(0), out.stride(0), new_res.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            num_warps=_row_warps(hidden),
        )
    out = out.view(x.shape)
    return out, (new_res.view(x.shape) if residual is not None else x)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    num_heads, num_kv_heads, half,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    col_ok = cols < half
    c = tl.load(cos_ptr + t * stride_cos + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_sin + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    heads = tl.arange(0, HEADS_PAD)
    ok = (heads < num_heads)[:, None] & col_ok[None, :]
    p1 = q_ptr + t * stride_qt + heads[:, None] * stride_qh + cols[None, :]
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=ok, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(p1 + half, (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=ok)

    kv_heads = tl.arange(0, KV_HEADS_PAD)
    ok = (kv_heads < num_kv_heads)[:, None] & col_ok[None, :]
    p1 = k_ptr + t * stride_kt + kv_heads[:, None] * stride_kh + cols[None, :]
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=ok, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=ok)
    tl.store(p1 + half, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=ok)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place (NeoX halves); cos, sin [T, rotary_dim // 2].
    q and k may be strided views (e.g. slices of a fused QKV output); their dims must be unit-stride."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, head_dim], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    num_tokens, half = q.shape[0], cos.shape[-1]
    if cos.shape != (num_tokens, half) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [{num_tokens}, rotary_dim // 2], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if 2 * half > q.shape[2] or k.shape[0] != num_tokens:
        raise ValueError(f"rotary_dim {2 * half} exceeds head_dim {q.shape[2]} or k has a different token count")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("q, k, cos and sin must be contiguous in their last dimension")
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q.shape[1], k.shape[1], half,
        HEADS_PAD=triton.next_power_of_2(q.shape[1]), KV_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF_PAD=triton.next_power_of_2(half),
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    # silu is rounded to the dtype before the product, as torch's silu(gate) * up does
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * I] (gate, then up) -> silu(gate) * up, shape [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even (gate and up halves), got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    block = min(4096, triton.next_power_of_2(max(inter, 1)))
    if x2.shape[0] and inter:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=_row_warps(block)
        )
    return out.view(*x.shape[:-1], inter)


def _row_warps(n: int) -> int:
    return 4 if n <= 2048 else 8 if n <= 8192 else 16
