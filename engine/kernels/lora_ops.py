"""Multi-LoRA delta for a batch whose tokens use different adapters (or none).

`add_lora` is the one entry point the model layers call: for every token t whose slot
s = token_slots[t] is >= 0 it adds scaling[s] * (lora_b[s] @ (lora_a[s] @ x[t])) to y[t], in
place. Adapters live in stacked slot tensors (lora_a [S, R, in], lora_b [S, out, R], ranks below
R zero-padded), so one call serves every adapter of the step.

Paths (same math up to floating-point rounding):
  * CUDA with Triton: the segmented shrink/expand kernels of `triton_lora.py` (no host sync, so
    it is safe under CUDA-graph capture).
  * otherwise plain torch, grouped by slot: one shrink and one expand matmul per distinct slot
    present. Rows are gathered with index_select and scattered with index_add_, or taken as a
    slice when a slot's tokens are contiguous (the usual case: the runner lays a request's
    tokens out together).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _triton_lora():
    try:
        from engine.kernels import triton_lora
    except Exception:  # Triton missing or broken: the torch path still works
        return None
    return triton_lora


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_lora() is not None


def check_lora_args(y, x, lora_a, lora_b, token_slots, scaling) -> None:
    """Raises ValueError naming the argument whose shape, device or layout does not fit."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be [T, in] and [T, out], got {tuple(x.shape)} and {tuple(y.shape)}")
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a must be [S, R, {x.shape[1]}], got {tuple(lora_a.shape)}")
    num_slots, rank = lora_a.shape[:2]
    if tuple(lora_b.shape) != (num_slots, y.shape[1], rank):
        raise ValueError(f"lora_b must be [{num_slots}, {y.shape[1]}, {rank}], got {tuple(lora_b.shape)}")
    if token_slots.shape != (x.shape[0],) or token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slots must be int32/int64 [{x.shape[0]}], got {token_slots.dtype} {tuple(token_slots.shape)}")
    if scaling.shape != (num_slots,):
        raise ValueError(f"scaling must be [{num_slots}], got {tuple(scaling.shape)}")
    devices = {t.device for t in (y, x, lora_a, lora_b, token_slots, scaling)}
    if len(devices) != 1:
        raise ValueError(f"all LoRA tensors must be on one device, got {sorted(map(str, devices))}")


def add_lora(
    y: torch.Tensor,  # [T, out], may be a column slice of a fused output; written in place
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, R, in]
    lora_b: torch.Tensor,  # [S, out, R]
    token_slots: torch.Tensor,  # [T] int32/int64, -1 = no adapter
    scaling: torch.Tensor,  # [S] float32 (alpha / r; 0 for an empty slot)
) -> None:
    """y[t] += scaling[s] * (lora_b[s] @ (lora_a[s] @ x[t])) for every t with s = token_slots[t]
    >= 0; rows of slot -1 are left untouched. Computed in x's dtype, accumulating in float32
    where the matmul does (CPU bf16/fp16 matmuls and the Triton kernels do)."""
    check_lora_args(y, x, lora_a, lora_b, token_slots, scaling)
    if x.shape[0] == 0 or lora_a.shape[0] == 0:
        return
    if _use_triton(x):
        _triton_lora().add_lora(y, x, lora_a, lora_b, token_slots, scaling)
        return
    add_lora_torch(y, x, lora_a, lora_b, token_slots, scaling)


def slot_groups(token_slots: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """(slot, rows) for each slot >= 0 present in token_slots, ascending. rows is a slice when the
    slot's tokens are contiguous, else an int64 index tensor in ascending token order.
    Synchronises with the device once (the slot list must reach the host)."""
    slots = token_slots.long()
    order = torch.argsort(slots, stable=True)
    present, counts = torch.unique_consecutive(slots[order], return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    # a slot's tokens are contiguous when its last index minus its first is count - 1
    firsts, lasts = order[starts], order[ends - 1]
    info = torch.stack([present, starts, ends, firsts, lasts, counts]).tolist()
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot, start, end, first, last, count in zip(*info):
        if slot < 0:
            continue
        rows = slice(first, last + 1) if last - first == count - 1 else order[start:end]
        groups.append((slot, rows))
    return groups


def add_lora_torch(y, x, lora_a, lora_b, token_slots, scaling) -> None:
    """The plain-torch path of `add_lora`: one (shrink, expand) matmul pair per slot present."""
    for slot, rows in slot_groups(token_slots):
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        a, b = lora_a[slot].to(x.dtype), lora_b[slot].to(x.dtype)
        # scaling goes on the [n, R] intermediate, R << out, so it costs almost nothing
        v = (xs @ a.t()).mul_(scaling[slot].to(x.dtype))
        delta = (v @ b.t()).to(y.dtype)
        if isinstance(rows, slice):
            y[rows].add_(delta)
        else:
            y.index_add_(0, rows, delta)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """v[t] = lora_a[token_slots[t]] @ x[t] as float32 [T, R]; rows of slot -1 are zero."""
    if _use_triton(x):
        return _triton_lora().lora_shrink(x, lora_a, token_slots)
    v = torch.zeros((x.shape[0], lora_a.shape[1]), dtype=torch.float32, device=x.device)
    for slot, rows in slot_groups(token_slots):
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        part = (xs @ lora_a[slot].to(x.dtype).t()).float()
        if isinstance(rows, slice):
            v[rows] = part
        else:
            v.index_copy_(0, rows, part)
    return v


def lora_expand(
    y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, scaling: torch.Tensor
) -> None:
    """y[t] += scaling[s] * (lora_b[s] @ v[t]) in place for t with s = token_slots[t] >= 0."""
    if _use_triton(y):
        _triton_lora().lora_expand(y, v, lora_b, token_slots, scaling)
        return
    for slot, rows in slot_groups(token_slots):
        vs = v[rows] if isinstance(rows, slice) else v.index_select(0, rows)
        delta = ((vs.to(y.dtype) @ lora_b[slot].to(y.dtype).t()) * scaling[slot]).to(y.dtype)
        if isinstance(rows, slice):
            y[rows].add_(delta)
        else:
            y.index_add_(0, rows, delta)
