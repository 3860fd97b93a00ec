"""Multi-LoRA delta for a batch whose tokens use different adapters (or none).

`add_lora` is the one entry point the model layers call: for every token t whose slot
s = token_slots[t] is >= 0 it adds scaling[s] * (lora_b[s] @ (lora_a[s] @ x[t])) to y[t], in
place. Adapters live in stacked slot tensors (lora_a [S, R, in], lora_b [S, out, R], ranks below
R zero-padded), so one call serves every adapter of the step.

Paths (same math up to floating-point rounding):
  * CUDA with Triton: the segmented shrink/expand kernels of `triton_lora.py` (no host sync, so
    it is safe under CUDA-graph capture).
  * otherwise plain torch. With a `LoRAMapping` whose slots are balanced (decode batches): the
    LoRA tokens gathered into [slots, rows] and two bmm for all slots. Else grouped by slot:
    one shrink and one expand matmul per distinct slot present, rows gathered with
    index_select (or a slice when a slot's tokens are contiguous, as a prefill's are).
    Scatters avoid index_add_ on column-slice outputs (slow strided path on CPU).
"""
from __future__ import annotations

import torch

from engine.kernels.lora_mapping import LoRAMapping, lora_mapping, slot_groups
from engine.kernels.optional_triton import triton_module

__all__ = ["LoRAMapping", "add_lora", "add_lora_torch", "lora_expand", "lora_mapping", "lora_shrink", "slot_groups"]


def _triton_lora():
    return triton_module("triton_lora")


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
    if isinstance(token_slots, LoRAMapping):
        if token_slots.num_tokens != x.shape[0] or token_slots.num_slots != lora_a.shape[0]:
            raise ValueError(f"token_slots mapping is for {token_slots.num_tokens} tokens and {token_slots.num_slots} "
                             f"slots, the tensors for {x.shape[0]} and {lora_a.shape[0]}")
        token_slots = token_slots.token_slots
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
    token_slots: torch.Tensor | LoRAMapping,  # [T] int32/int64, -1 = no adapter
    scaling: torch.Tensor,  # [S] float32 (alpha / r; 0 for an empty slot)
) -> None:
    """y[t] += scaling[s] * (lora_b[s] @ (lora_a[s] @ x[t])) for every t with s = token_slots[t]
    >= 0; rows of slot -1 are left untouched. Computed in x's dtype, accumulating in float32
    where the matmul does (CPU bf16/fp16 matmuls and the Triton kernels do).

    token_slots may be a `LoRAMapping` (`lora_mapping(token_slots, S)`) built once per step:
    every call of the step then skips the grouping (a sort and, on CPU, a host copy)."""
    check_lora_args(y, x, lora_a, lora_b, token_slots, scaling)
    if x.shape[0] == 0 or lora_a.shape[0] == 0:
        return
    if _use_triton(x):
        _triton_lora().add_lora(y, x, lora_a, lora_b, token_slots, scaling)
        return
    add_lora_torch(y, x, lora_a, lora_b, token_slots, scaling)


def add_lora_torch(y, x, lora_a, lora_b, token_slots, scaling) -> None:
    """The plain-torch path of `add_lora`: two bmm calls over all slots when the mapping has a
    padded layout (balanced slots), else one (shrink, expand) matmul pair per slot present."""
    mapping = token_slots if isinstance(token_slots, LoRAMapping) else None
    if mapping is not None and mapping.padded is not None:
        _add_lora_padded(y, x, lora_a, lora_b, mapping.padded, scaling)
        return
    groups = mapping.groups if mapping is not None and mapping.groups is not None else None
    if groups is None:
        groups = slot_groups(mapping.token_slots if mapping is not None else token_slots)
    _add_lora_grouped(y, x, lora_a, lora_b, groups, scaling)


def _add_lora_grouped(y, x, lora_a, lora_b, groups, scaling) -> None:
    for slot, rows in groups:
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        a, b = lora_a[slot].to(x.dtype), lora_b[slot].to(x.dtype)
        # scaling goes on the [n, R] intermediate, R << out, so it costs almost nothing
        v = (xs @ a.t()).mul_(scaling[slot].to(x.dtype))
        delta = (v @ b.t()).to(y.dtype)
        if isinstance(rows, slice):
            y[rows].add_(delta)
        else:
            _scatter_add(y, rows, delta)


def _add_lora_padded(y, x, lora_a, lora_b, padded, scaling) -> None:
    """All slots at once: gather the LoRA tokens into [P, max_rows, in], two bmm, scatter back.
    Pad rows get a zero scale, so they add exactly zero to the token they repeat (x finite)."""
    a, b, scale = lora_a, lora_b, scaling
    if isinstance(padded.present, slice):
        a, b, scale = a[padded.present], b[padded.present], scale[padded.present]
    elif padded.present is not None:
        a, b, scale = (t.index_select(0, padded.present) for t in (a, b, scale))
    num_present = a.shape[0]
    xs = x.index_select(0, padded.gather).view(num_present, padded.max_rows, x.shape[1])
    v = torch.bmm(xs, a.to(x.dtype).transpose(1, 2))  # [P, max_rows, R]
    row_scale = scale.to(x.dtype).view(-1, 1, 1)
    v.mul_(row_scale if padded.row_mask is None else row_scale * padded.row_mask.to(x.dtype))
    delta = torch.bmm(v, b.to(x.dtype).transpose(1, 2)).view(-1, y.shape[1]).to(y.dtype)  # [P * max_rows, out]
    if _rows_contiguous(y):
        y.index_add_(0, padded.gather, delta)
    elif isinstance(padded.lora_rows, slice):
        y[padded.lora_rows].add_(delta.index_select(0, padded.inverse))
    else:
        _scatter_add(y, padded.gather, delta)


def _rows_contiguous(y: torch.Tensor) -> bool:
    return y.stride(1) == 1 and y.stride(0) == y.shape[1]


def _scatter_add(y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """y[rows] += delta, duplicates summed. On a column slice of a wider tensor (q of a fused
    qkv) index_add_ takes a slow strided path on CPU (5-15x slower, measured); index_put_ with
    accumulate does not."""
    if _rows_contiguous(y):
        y.index_add_(0, rows, delta)
    else:
        y.index_put_((rows,), delta, accumulate=True)


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
            _scatter_add(y, rows, delta)
