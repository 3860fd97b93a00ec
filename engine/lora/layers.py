"""LoRA-aware projections: wrappers that replace a model's projection modules by name.

`LoRALinear` runs the original module, then adds each targeted checkpoint projection's delta to
its column slice of the output through `engine.kernels.lora_ops.add_lora`, for the tokens whose
adapter targets it. Which token uses which slot comes from the step's `LoRAStep`, which the
model runner fills before every forward pass (`LoRAManager.set_step`); with no adapter in the
step the wrapper costs one attribute check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.kernels.lora_mapping import LoRAMapping
from engine.kernels.lora_ops import add_lora
from engine.lora.slots import LoRASlots, SiteSlots
from engine.lora.targets import ModelTargets


@dataclass
class LoRAStep:
    """The current step's token -> slot mapping, shared by all wrappers of one model.

    ``token_slots`` the step's `LoRAMapping` (token -> slot, -1 = base model, grouped by slot
    once per step; engine/kernels/lora_mapping.py), or None when no token of the step uses an
    adapter; ``slots`` the distinct slots present."""

    token_slots: LoRAMapping | None = None
    slots: list[int] = field(default_factory=list)


class LoRALinear(nn.Module):
    """``base(x)`` plus, for each ``(offset, size, site)`` part, the adapters' deltas in output
    columns ``offset .. offset + size``."""

    def __init__(self, base: nn.Module, parts: list[tuple[int, int, SiteSlots]], step: LoRAStep):
        super().__init__()
        self.base = base
        self.parts = parts
        self.step = step
        self.whole = len(parts) == 1 and parts[0][0] == 0  # one part covering the full output?

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        step = self.step
        if step.token_slots is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        for offset, size, site in self.parts:
            if not any(site.has[s] for s in step.slots):
                continue
            out = y2 if self.whole and size == y2.shape[1] else y2[:, offset:offset + size]
            add_lora(out, x2, site.a, site.b, step.token_slots, site.scaling)
        return y


def install_lora_layers(model: nn.Module, targets: ModelTargets, slots: LoRASlots, step: LoRAStep) -> None:
    """Replaces every targetable module of every layer with a `LoRALinear` around it (weights
    stay where they are: the original module becomes the wrapper's ``base``)."""
    layers = model.get_submodule(targets.layers_path)
    by_module: dict[str, list] = {}
    for site in targets.sites:
        by_module.setdefault(site.module, []).append(site)
    for index, layer in enumerate(layers):
        for module_path, sites in by_module.items():
            parent_path, _, attr = module_path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {index} {module_path} already has LoRA installed")
            parts = [(s.offset, s.out_features, slots.sites[(index, s.name)]) for s in sites]
            setattr(parent, attr, LoRALinear(base, parts, step))
