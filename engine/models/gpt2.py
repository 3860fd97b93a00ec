"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused q/k/v projection, GELU MLP.

HF stores GPT-2's projections as `Conv1D` with weights shaped [in, out] (transposed compared
with nn.Linear); they are transposed once at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.kernels.backend import AttentionBackend
from engine.models.base import CausalLM, MappedWeight
from engine.models.spec import KVCacheSpec

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
# Conv1D modules whose [in, out] weights become [out, in] Linear weights.
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class GPT2Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, scale: float, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.scale = scale
        self.backend = backend
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(self, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.c_proj(out.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(hidden, inner)
        self.c_proj = nn.Linear(inner, hidden)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        hidden, heads = config.n_embd, config.n_head
        scale = (hidden // heads) ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(hidden, heads, scale, backend)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, config.n_inner or 4 * hidden, config.activation_function)

    def forward(self, x, kv_cache, meta):
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, config, backend: AttentionBackend):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i, backend) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with the output projection tied to the token embedding unless the config says not."""

    def __init__(self, config, backend: AttentionBackend, device: torch.device | str):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function must be one of {sorted(_ACTIVATIONS)}, got {config.activation_function!r}"
            )
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.max_model_len = int(config.n_positions)
        self.kv_spec = KVCacheSpec(config.n_layer, config.n_head, config.n_embd // config.n_head)
        self.transformer = GPT2Transformer(config, backend)
        if not self.tied:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def lm_head_weight(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.tied else self.lm_head.weight

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        self.check_inputs(input_ids, positions, kv_caches)
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block, kv_cache in zip(t.h, kv_caches):
            x = block(x, kv_cache, meta)
        return t.ln_f(x)

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[MappedWeight]:
        if name.startswith("lm_head."):
            return [] if self.tied else [(name, None, tensor)]
        if not name.startswith("transformer."):  # original OpenAI checkpoints omit the prefix
            name = "transformer." + name
        module, _, kind = name.rpartition(".")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            return []
        if kind == "weight" and module.endswith(_CONV1D):
            tensor = tensor.t()
        return [(name, None, tensor)]
