"""`LoRAMapping`: a step's token -> slot mapping, prepared once and reused by every LoRA layer.

A model calls `add_lora` once per targeted projection per layer (7 x num_layers times a step for
a Llama with every projection targeted), always with the same token -> slot mapping. Grouping
tokens by slot costs a sort and a device -> host copy, so `lora_mapping` does it once per step
and `add_lora` accepts the result in place of the raw `token_slots` tensor.

It holds what each path needs:
  * `groups`: (slot, rows) per slot present, rows a slice for a contiguous run, else an index
    tensor: the grouped torch path (one shrink + expand matmul pair per slot).
  * `padded`: when the slots' token counts are balanced (a decode batch spread over adapters),
    a layout of the LoRA tokens as [num_present, max_rows] (short slots padded) so the torch
    path runs two bmm calls for all slots at once instead of a pair of matmuls per slot: on CPU
    the per-op overhead, not the flops, dominates the small LoRA products.
  * `segments`: the Triton kernels' grouping, built lazily on the device (CUDA only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.optional_triton import triton_module

# the padded bmm layout computes num_present * max_rows rows; use it while that is at most this
# many times the real LoRA token count (above, the grouped path wastes fewer flops)
PADDED_WASTE_LIMIT = 1.5


@dataclass(frozen=True)
class PaddedLayout:
    """LoRA tokens laid out as [num_present, max_rows]: row j of slot present[i] is token
    gather[i * max_rows + j]; pad rows repeat a real LoRA token and have row_mask 0."""

    # the P slots present: None when every slot 0..S-1 is, a slice for a run of consecutive slots
    # (the weights are then a view), else [P] int64 slot ids (the weights are gathered per call)
    present: torch.Tensor | slice | None
    gather: torch.Tensor  # [P * max_rows] int64 token index per padded row
    row_mask: torch.Tensor | None  # [P, max_rows, 1] 1.0 real / 0.0 pad; None when nothing is padded
    max_rows: int
    # the LoRA tokens in ascending order, as a slice when they are contiguous (e.g. every token),
    # and the padded row of each: delta rows in token order are delta.index_select(0, inverse)
    lora_rows: slice | torch.Tensor
    inverse: torch.Tensor  # [num LoRA tokens] int64


@dataclass(frozen=True)
class LoRAMapping:
    """A step's token -> slot mapping with its groupings (see the module docstring).
    Guarantees: groups and padded describe exactly the tokens with slot >= 0."""

    token_slots: torch.Tensor  # [T] int64, on the model's device; -1 = base model
    num_slots: int
    groups: list[tuple[int, slice | torch.Tensor]] | None  # None on CUDA with Triton (no host sync)
    padded: PaddedLayout | None
    segments: object | None = None  # triton_lora.Segments on CUDA with Triton

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


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


def _rows_index(rows: slice | torch.Tensor, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def _padded_layout(groups, num_slots: int, device) -> PaddedLayout | None:
    sizes = [(r.stop - r.start) if isinstance(r, slice) else r.shape[0] for _, r in groups]
    if len(groups) < 2:  # one slot: the grouped path is already a single matmul pair
        return None
    max_rows = max(sizes)
    if len(groups) * max_rows > PADDED_WASTE_LIMIT * sum(sizes):
        return None
    pad_token = _rows_index(groups[0][1], device)[:1]
    gather, mask = [], []
    for (_, rows), n in zip(groups, sizes):
        gather += [_rows_index(rows, device), pad_token.expand(max_rows - n)]
        mask += [n, max_rows - n]
    padded_any = any(n != max_rows for n in sizes)
    row_mask = None
    if padded_any:
        flags = torch.repeat_interleave(torch.tensor([1.0, 0.0] * len(groups)), torch.tensor(mask))
        row_mask = flags.view(len(groups), max_rows, 1).to(device)
    slots = [s for s, _ in groups]
    if slots == list(range(num_slots)):
        present = None
    elif slots == list(range(slots[0], slots[-1] + 1)):  # a run of slots: a view, no weight copy
        present = slice(slots[0], slots[-1] + 1)
    else:
        present = torch.tensor(slots, device=device)
    gather_all = torch.cat(gather)
    real = torch.arange(len(groups) * max_rows, device=device)
    if row_mask is not None:
        real = real[row_mask.view(-1) > 0]
    tokens = gather_all[real]
    tokens_sorted, perm = torch.sort(tokens)
    first, last = tokens_sorted[[0, -1]].tolist()
    lora_rows = slice(first, last + 1) if last - first + 1 == tokens.shape[0] else tokens_sorted
    return PaddedLayout(present, gather_all, row_mask, max_rows, lora_rows, real[perm])


def lora_mapping(token_slots: torch.Tensor, num_slots: int) -> LoRAMapping:
    """Prepares a step's mapping. token_slots: [T] int32/int64 with values in [-1, num_slots).
    On CUDA with Triton it only groups tokens on the device (no sync, CUDA-graph safe); else it
    synchronises once and checks the slot range."""
    slots = token_slots.long()
    if slots.is_cuda:
        triton_lora = triton_module("triton_lora")
        if triton_lora is not None:  # else the torch path's groups below
            return LoRAMapping(slots, num_slots, None, None, triton_lora.make_segments(slots, num_slots))
    groups = slot_groups(slots)
    if groups and groups[-1][0] >= num_slots:
        raise ValueError(f"token_slots holds slot {groups[-1][0]} but there are only {num_slots} slots")
    padded = _padded_layout(groups, num_slots, slots.device) if slots.device.type == "cpu" else None
    return LoRAMapping(slots, num_slots, groups, padded)
