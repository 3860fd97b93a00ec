"""Which class implements which HF architecture name."""
from __future__ import annotations

from types import MappingProxyType

from engine.models.base import CausalLM
from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

# Read-only: adding an architecture means adding a line here.
ARCHITECTURES: "MappingProxyType[str, type[CausalLM]]" = MappingProxyType({
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
})

# Configs read from GGUF files carry a model_type but no `architectures` list.
_BY_MODEL_TYPE = MappingProxyType({
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
})


def architecture_name(config) -> str:
    """`config.architectures[0]`, or the causal-LM class for `config.model_type` when absent."""
    archs = getattr(config, "architectures", None)
    if archs:
        return archs[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"config has no architectures and an unsupported model_type {model_type!r}; "
        f"supported architectures: {', '.join(ARCHITECTURES)}"
    )


def model_class(config) -> type[CausalLM]:
    """The implementation for this config; ValueError listing the supported ones otherwise."""
    name = architecture_name(config)
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
