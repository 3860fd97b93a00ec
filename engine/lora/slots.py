"""The adapters a step can use, stacked on the model's device: ``max_loras`` slots.

For every layer and every targetable projection (`engine/lora/targets.py`) there is one
``A [S, R, in]``, one ``B [S, out, R]`` and one ``scaling [S]`` (float32), S = ``max_loras``,
R = ``max_lora_rank``. An adapter of rank r < R fills the first r ranks and leaves the rest
zero, so the padded product equals the unpadded one. A slot whose adapter does not target a
projection holds zeros there with scaling 0, and ``has[slot]`` is False so the layer can skip
the projection when no adapter of the step targets it.

Guarantees: ``activate`` places every requested adapter in a slot (copying it from CPU memory
when it is not there yet) and evicts only slots that the call does not need, least recently
used first; it refuses more adapters than slots.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from engine.lora.adapter import LoRAAdapter
from engine.lora.targets import ModelTargets


@dataclass
class SiteSlots:
    """The stacked weights of one projection of one layer."""

    a: torch.Tensor  # [S, R, in]
    b: torch.Tensor  # [S, out, R]
    scaling: torch.Tensor  # [S] float32
    has: list[bool]  # has[slot]: the slot's adapter targets this projection


class LoRASlots:
    def __init__(self, targets: ModelTargets, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.num_slots, self.max_rank = max_loras, max_rank
        self.sites: dict[tuple[int, str], SiteSlots] = {}
        for layer in range(targets.num_layers):
            for site in targets.sites:
                self.sites[(layer, site.name)] = SiteSlots(
                    torch.zeros(max_loras, max_rank, site.in_features, dtype=dtype, device=device),
                    torch.zeros(max_loras, site.out_features, max_rank, dtype=dtype, device=device),
                    torch.zeros(max_loras, dtype=torch.float32, device=device),
                    [False] * max_loras,
                )
        self._uid: list[int | None] = [None] * max_loras  # the adapter in each slot
        self._last_used = [0] * max_loras
        self._clock = 0
        self.num_loads = 0  # adapters copied into a slot so far (for tests and stats)

    def slot_of(self, uid: int) -> int | None:
        return self._uid.index(uid) if uid in self._uid else None

    def activate(self, uids: Collection[int], lookup: Callable[[int], LoRAAdapter]) -> dict[int, int]:
        """Slot of each of ``uids``, loading the missing ones over free or least recently used
        slots not among ``uids``."""
        if len(uids) > self.num_slots:
            raise ValueError(f"a step uses {len(uids)} adapters but there are only max_loras={self.num_slots} slots")
        self._clock += 1
        placed: dict[int, int] = {}
        missing = []
        for uid in uids:
            slot = self.slot_of(uid)
            if slot is None:
                missing.append(uid)
            else:
                placed[uid] = slot
                self._last_used[slot] = self._clock
        for uid in missing:
            free = [s for s in range(self.num_slots) if s not in placed.values()]
            slot = min(free, key=lambda s: (self._uid[s] is not None, self._last_used[s]))
            self._load(slot, lookup(uid))
            placed[uid] = slot
            self._last_used[slot] = self._clock
        return placed

    def evict(self, uid: int) -> None:
        """Empties the slot holding ``uid`` (an unloaded adapter), if any."""
        slot = self.slot_of(uid)
        if slot is not None:
            self._clear(slot)

    @torch.no_grad()
    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        r = adapter.rank
        for key, site in self.sites.items():
            pair = adapter.weights.get(key)
            if pair is None:
                if site.has[slot]:
                    site.a[slot].zero_()
                    site.b[slot].zero_()
                site.scaling[slot] = 0.0
                site.has[slot] = False
                continue
            a, b = pair
            site.a[slot, :r].copy_(a)
            site.a[slot, r:].zero_()
            site.b[slot, :, :r].copy_(b)
            site.b[slot, :, r:].zero_()
            site.scaling[slot] = adapter.scaling
            site.has[slot] = True
        self._uid[slot] = adapter.uid
        self.num_loads += 1

    @torch.no_grad()
    def _clear(self, slot: int) -> None:
        for site in self.sites.values():
            if site.has[slot]:
                site.a[slot].zero_()
                site.b[slot].zero_()
            site.scaling[slot] = 0.0
            site.has[slot] = False
        self._uid[slot] = None
