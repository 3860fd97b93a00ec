"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused q/k/v projection, GELU MLP.

HF stores GPT-2's projections as `Conv1D` with weights shaped [in, out] (transposed compared
with nn.Linear); they are transposed once at load time.

Tensor parallelism (`TPContext`, size > 1): c_attn and mlp.c_fc are column-parallel (each rank
its share of the heads and of the inner features), both c_proj row-parallel (their bias added
once after the all-reduce); token and position embeddings are replicated, the LM head is
vocab-parallel when the vocabulary splits evenly (GPT-2's own 50257 does not: it stays whole).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.kernels.backend import AttentionBackend
from engine.models.base import CausalLM, MappedWeight
from engine.models.parallel_linear import ColumnParallelLinear, RowParallelLinear
from engine.models.spec import KVCacheSpec
from engine.models.tensor_parallel import Shard, TPContext, head_shards, split, take, vocab_shard

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
    def __init__(self, hidden: int, num_heads: int, scale: float, backend: AttentionBackend, tp: TPContext):
        super().__init__()
        self.head_dim = hidden // num_heads
        heads, _ = head_shards(num_heads, num_heads, self.head_dim, tp)
        self.num_heads = heads.size // self.head_dim  # this rank's
        self.scale = scale
        self.backend = backend
        self.c_attn = ColumnParallelLinear(hidden, [heads] * 3, bias=True)
        self.c_proj = RowParallelLinear(heads, hidden, bias=True, tp=tp)

    def forward(self, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.c_proj(out.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str, tp: TPContext):
        super().__init__()
        shard = split(inner, tp, "n_inner")
        self.c_fc = ColumnParallelLinear(hidden, [shard], bias=True)
        self.c_proj = RowParallelLinear(shard, hidden, bias=True, tp=tp)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, backend: AttentionBackend, tp: TPContext):
        super().__init__()
        hidden, heads = config.n_embd, config.n_head
        scale = (hidden // heads) ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(hidden, heads, scale, backend, tp)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, config.n_inner or 4 * hidden, config.activation_function, tp)

    def forward(self, x, kv_cache, meta):
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, config, backend: AttentionBackend, tp: TPContext):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i, backend, tp) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with the output projection tied to the token embedding unless the config says not."""

    def __init__(self, config, backend: AttentionBackend, device: torch.device | str,
                 tp: TPContext = TPContext()):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function must be one of {sorted(_ACTIVATIONS)}, got {config.activation_function!r}"
            )
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.max_model_len = int(config.n_positions)
        self.transformer = GPT2Transformer(config, backend, tp)
        self.kv_spec = KVCacheSpec(config.n_layer, self.transformer.h[0].attn.num_heads, config.n_embd // config.n_head)
        self.tp, self.vocab_shard = tp, vocab_shard(config.vocab_size, tp)
        if not self.tied:
            rows = self.vocab_shard.size if self.vocab_shard else config.vocab_size
            self.lm_head = nn.Linear(config.n_embd, rows, bias=False)

    def lm_head_weight(self) -> torch.Tensor:
        if not self.tied:
            return self.lm_head.weight
        w, shard = self.transformer.wte.weight, self.vocab_shard
        return w if shard is None else w.narrow(0, shard.start, shard.size)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(input_ids, positions, kv_caches)
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block, kv_cache in zip(t.h, kv_caches):
            x = block(x, kv_cache, meta)
        return t.ln_f(x if keep_rows is None else x.index_select(0, keep_rows))

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[MappedWeight]:
        if name.startswith("lm_head."):
            if self.tied:
                return []
            return [(name, None, tensor if self.vocab_shard is None else take(tensor, 0, self.vocab_shard))]
        if not name.startswith("transformer."):  # original OpenAI checkpoints omit the prefix
            name = "transformer." + name
        module, _, kind = name.rpartition(".")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            return []
        if module.endswith(_CONV1D):
            layer = self.get_submodule(module)
            if isinstance(layer, ColumnParallelLinear):
                return self._column_blocks(name, kind, tensor, layer)
            return [(name, None, layer.shard(kind, tensor, transposed=True))]
        return [(name, None, tensor)]

    @staticmethod
    def _column_blocks(name: str, kind: str, tensor, layer: ColumnParallelLinear) -> list[MappedWeight]:
        """This rank's rows of each block of a fused Conv1D (c_attn: q, k, v side by side in
        the checkpoint's output columns), read straight from the fused tensor."""
        out, row = [], 0
        for i, b in enumerate(layer.blocks):
            fused = Shard(i * b.full + b.start, b.size, len(layer.blocks) * b.full)
            part = take(tensor, 1 if kind == "weight" else 0, fused)
            out.append((name, row, part.t() if kind == "weight" else part))
            row += b.size
        return out
