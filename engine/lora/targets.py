"""Where an adapter's weights go in our models: the projections a LoRA may target, by the names
PEFT gives them in a checkpoint, and the column slice of our (possibly fused) module each one
writes.

Our Llama family fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, so the delta
of an adapter's ``q_proj`` lands in the first ``q_size`` columns of ``qkv_proj``'s output, and so
on. The models themselves are not changed: `engine/lora/layers.py` wraps these modules by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TargetSite:
    """One checkpoint projection of a layer an adapter may target.

    ``name`` is its path inside a layer as PEFT spells it (``self_attn.q_proj``, ``attn.c_proj``);
    its delta is added to output columns ``offset .. offset + out_features`` of our module
    ``module`` (a path inside the layer), whose input has ``in_features``."""

    name: str
    module: str
    offset: int
    out_features: int
    in_features: int

    @property
    def short_name(self) -> str:
        """The name ``target_modules`` uses (``q_proj``, ``c_proj``)."""
        return self.name.rpartition(".")[2]


@dataclass(frozen=True)
class ModelTargets:
    """The LoRA-targetable projections of one model: ``layers_path`` is the ModuleList of its
    decoder layers (``model.layers``), and every layer has the same ``sites``."""

    layers_path: str
    num_layers: int
    sites: tuple[TargetSite, ...]

    def short_names(self) -> set[str]:
        return {s.short_name for s in self.sites}

    def site(self, name: str) -> TargetSite | None:
        return next((s for s in self.sites if s.name == name), None)

    def parse_key(self, key: str) -> tuple[int, str, str] | None:
        """``(layer, site name, "A" | "B")`` for a PEFT weight name such as
        ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (an adapter name
        segment before ``.weight`` is allowed), or None when it is not a lora_A/lora_B matrix of
        a decoder layer."""
        pattern = rf"(?:^|\.){re.escape(self.layers_path)}\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$"
        m = re.search(pattern, key)
        return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


def model_targets(model: nn.Module) -> ModelTargets:
    """The targets of one of our models; ValueError for an architecture without LoRA support."""
    from engine.models.gpt2 import GPT2LMHeadModel
    from engine.models.llama import LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM):
        d = model.dims
        q, kv, inter, hidden = d.q_size, d.kv_size, d.intermediate_size, d.hidden_size
        sites = (
            TargetSite("self_attn.q_proj", "self_attn.qkv_proj", 0, q, hidden),
            TargetSite("self_attn.k_proj", "self_attn.qkv_proj", q, kv, hidden),
            TargetSite("self_attn.v_proj", "self_attn.qkv_proj", q + kv, kv, hidden),
            TargetSite("self_attn.o_proj", "self_attn.o_proj", 0, hidden, q),
            TargetSite("mlp.gate_proj", "mlp.gate_up_proj", 0, inter, hidden),
            TargetSite("mlp.up_proj", "mlp.gate_up_proj", inter, inter, hidden),
            TargetSite("mlp.down_proj", "mlp.down_proj", 0, hidden, inter),
        )
        return ModelTargets("model.layers", d.num_layers, sites)
    if isinstance(model, GPT2LMHeadModel):
        block = model.transformer.h[0]
        hidden, inner = block.attn.c_attn.in_features, block.mlp.c_fc.out_features
        sites = (
            TargetSite("attn.c_attn", "attn.c_attn", 0, 3 * hidden, hidden),
            TargetSite("attn.c_proj", "attn.c_proj", 0, hidden, hidden),
            TargetSite("mlp.c_fc", "mlp.c_fc", 0, inner, hidden),
            TargetSite("mlp.c_proj", "mlp.c_proj", 0, hidden, inner),
        )
        return ModelTargets("transformer.h", len(model.transformer.h), sites)
    raise ValueError(f"enable_lora: LoRA is not supported for {type(model).__name__}")
