"""`LoRAManager`: multi-LoRA serving for one model.

It owns the CPU registry of loaded adapters (`registry.py`), the device slots (`slots.py`) and
the wrapped projections (`layers.py`), and turns a step's per-sequence adapters into the
token -> slot mapping the layers read (`set_step`). The engine calls it; it never sees the
scheduler or the KV cache.
"""
from __future__ import annotations

from collections.abc import Container, Sequence
from functools import partial

import torch
from torch import nn

from engine.kernels.lora_ops import lora_mapping
from engine.lora.adapter import LoRAAdapter, check_request, load_adapter
from engine.lora.errors import LoRAError
from engine.lora.layers import LoRAStep, install_lora_layers
from engine.lora.registry import LoRARegistry
from engine.lora.request import LoRARequest
from engine.lora.slots import LoRASlots
from engine.lora.targets import model_targets


class LoRAManager:
    """``max_loras`` adapters can be on the device at once (one slot each), of rank up to
    ``max_lora_rank``; ``max_cpu_loras`` (None: unbounded) adapters can be loaded."""

    def __init__(self, model: nn.Module, base_config: dict | None, *, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int | None, dtype: torch.dtype, device: torch.device | str):
        self.targets = model_targets(model)
        self.device = device
        self.max_loras = max_loras
        loader = partial(load_adapter, targets=self.targets, max_rank=max_lora_rank, base_config=base_config)
        self.registry = LoRARegistry(loader, max_cpu_loras)
        self.slots = LoRASlots(self.targets, max_loras, max_lora_rank, dtype, device)
        self.step = LoRAStep()
        install_lora_layers(model, self.targets, self.slots, self.step)

    # -- adapters -----------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> LoRAAdapter:
        return self.registry.add(request)

    def remove(self, name: str) -> bool:
        return self.registry.remove(name) is not None

    def get(self, name: str) -> LoRAAdapter | None:
        return self.registry.get(name)

    def resolve(self, request: LoRARequest) -> LoRAAdapter:
        """The loaded adapter a request names (by ``lora_name``); `LoRAError` with param
        "model" when none of that name is loaded."""
        check_request(request)
        adapter = self.registry.get(request.lora_name)
        if adapter is None:
            raise LoRAError("model", f"model: no LoRA adapter named {request.lora_name!r} is loaded")
        return adapter

    def list(self) -> list[LoRARequest]:
        return self.registry.list()

    def purge(self, live_uids: Container[int]) -> None:
        """Drops removed adapters no live request uses any more, and frees their slots."""
        for uid in self.registry.purge(live_uids):
            self.slots.evict(uid)

    @property
    def has_retired(self) -> bool:
        return self.registry.has_retired

    # -- the step -----------------------------------------------------------------------------
    def set_step(self, sequences: Sequence[tuple[int | None, int]]) -> None:
        """Prepares the forward pass of a step whose flat batch is ``sequences`` in order, each
        ``(adapter uid or None, number of tokens fed)``: puts the step's adapters in slots and
        sets the token -> slot mapping every LoRA layer reads."""
        uids = {uid for uid, _ in sequences if uid is not None}
        if not uids:
            self.step.token_slots, self.step.slots = None, []
            return
        slot_of = self.slots.activate(uids, self.registry.by_uid)
        per_seq = torch.tensor([-1 if uid is None else slot_of[uid] for uid, _ in sequences], dtype=torch.long)
        counts = torch.tensor([n for _, n in sequences], dtype=torch.long)
        token_slots = torch.repeat_interleave(per_seq, counts).to(self.device, non_blocking=True)
        # grouped by slot once here, not in each of the step's 7 x num_layers add_lora calls
        self.step.token_slots = lora_mapping(token_slots, self.max_loras)
        self.step.slots = sorted(slot_of.values())
