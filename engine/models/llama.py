"""The Llama family: Llama, Mistral, Qwen2 and Qwen3 share one implementation with flags.

Differences handled: GQA, q/k/v (and o) biases, MLP biases, Qwen3's per-head RMSNorm on q and k
before rope, an explicit `head_dim`, tied embeddings and rope scaling (see `rotary.py`).

q/k/v are one Linear and gate/up are one Linear (fused at load time), so a layer runs four
matmuls. Attention goes only through the paged KV cache via the attention backend.

Tensor parallelism (`TPContext`, size > 1): q/k/v and gate/up are column-parallel, o and down
row-parallel (one all-reduce each per layer); each rank runs its share of the query heads and
the KV heads they read (KV heads replicated when there are fewer than ranks), and its KV cache
holds only those. Qwen3's per-head q/k norms apply per head, so they work unchanged on a shard.
The embedding is replicated on every rank; the LM head is vocab-parallel (each rank computes
its slice of the logits, then all gather: docs/scaling.md has the measurement), reading its rows
of the embedding when tied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.kernels.backend import AttentionBackend
from engine.kernels.ops import apply_rotary, silu_and_mul
from engine.models.base import CausalLM, MappedWeight, RMSNorm
from engine.models.parallel_linear import ColumnParallelLinear, GateUpLinear, RowParallelLinear
from engine.models.tensor_parallel import TPContext, head_shards, split, take, vocab_shard
from engine.models.rotary import RotaryTables, rope_config_from_hf
from engine.models.spec import KVCacheSpec

# checkpoint projection name -> (our fused projection, index of its block of rows)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@dataclass(frozen=True)
class LlamaDims:
    """Everything the layers need from the HF config, validated."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


class LlamaAttention(nn.Module):
    def __init__(self, d: LlamaDims, backend: AttentionBackend, tp: TPContext):
        super().__init__()
        self.d = d
        self.backend = backend
        self.scale = d.head_dim**-0.5
        q, kv = head_shards(d.num_heads, d.num_kv_heads, d.head_dim, tp)
        self.q_size, self.kv_size = q.size, kv.size  # this rank's
        self.num_heads, self.num_kv_heads = q.size // d.head_dim, kv.size // d.head_dim
        self.qkv_proj = ColumnParallelLinear(d.hidden_size, [q, kv, kv], bias=d.qkv_bias)
        self.o_proj = RowParallelLinear(q, d.hidden_size, bias=d.o_bias, tp=tp)
        if d.qk_norm:
            self.q_norm = RMSNorm(d.head_dim, d.rms_norm_eps)
            self.k_norm = RMSNorm(d.head_dim, d.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``keep_rows``: only those rows go through the output projection (see CausalLM)."""
        d = self.d
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, d.head_dim)
        k = k.view(-1, self.num_kv_heads, d.head_dim)
        v = v.view(-1, self.num_kv_heads, d.head_dim)
        if d.qk_norm:
            q = self.q_norm(q.reshape(-1, d.head_dim))[0].view(q.shape)
            k = self.k_norm(k.reshape(-1, d.head_dim))[0].view(k.shape)
        apply_rotary(q, k, cos, sin)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale).reshape(-1, self.q_size)
        return self.o_proj(out if keep_rows is None else out.index_select(0, keep_rows))


class LlamaMLP(nn.Module):
    def __init__(self, d: LlamaDims, tp: TPContext):
        super().__init__()
        inner = split(d.intermediate_size, tp, "intermediate_size")
        self.gate_up_proj = GateUpLinear(d.hidden_size, inner, bias=d.mlp_bias)
        self.down_proj = RowParallelLinear(inner, d.hidden_size, bias=d.mlp_bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if isinstance(gate_up, GateUpLinear):  # SiLU in the GEMM's epilogue where it can be
            return self.down_proj(gate_up.silu_and_mul_forward(x))
        return self.down_proj(silu_and_mul(gate_up(x)))  # wrapped (LoRA): it adds to the full output


class LlamaDecoderLayer(nn.Module):
    def __init__(self, d: LlamaDims, backend: AttentionBackend, tp: TPContext):
        super().__init__()
        self.input_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.self_attn = LlamaAttention(d, backend, tp)
        self.post_attention_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.mlp = LlamaMLP(d, tp)

    def forward(self, x, residual, cos, sin, kv_cache, meta, keep_rows=None):
        # The residual stream is carried separately so each norm can fuse the residual add.
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta, keep_rows)
        if keep_rows is not None:  # the rows no one reads skip the output projection and the MLP
            residual = residual.index_select(0, keep_rows)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, d: LlamaDims, backend: AttentionBackend, tp: TPContext):
        super().__init__()
        # An explicit (uninitialised) weight skips Embedding's random init, whose first call on the
        # meta device imports torch's decompositions (~1.3 CPU-s per process): loading overwrites it.
        self.embed_tokens = nn.Embedding(d.vocab_size, d.hidden_size,
                                         _weight=torch.empty(d.vocab_size, d.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(d, backend, tp) for _ in range(d.num_layers))
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama (also the base of Mistral, Qwen2 and Qwen3 below)."""

    @classmethod
    def family_flags(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=False)

    def __init__(self, config, backend: AttentionBackend, device: torch.device | str,
                 tp: TPContext = TPContext()):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu' for {type(self).__name__}, got {config.hidden_act!r}")
        num_heads = config.num_attention_heads
        d = LlamaDims(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            **self.family_flags(config),
        )
        self.dims = d
        self.max_model_len = self.context_limit(config)
        self.model = LlamaModel(d, backend, tp)
        self.kv_spec = KVCacheSpec(d.num_layers, self.model.layers[0].self_attn.num_kv_heads, d.head_dim)
        self.tp, self.vocab_shard = tp, vocab_shard(d.vocab_size, tp)
        if not d.tie_word_embeddings:
            rows = self.vocab_shard.size if self.vocab_shard else d.vocab_size
            self.lm_head = nn.Linear(d.hidden_size, rows, bias=False)
        rc = rope_config_from_hf(config, d.head_dim, config.max_position_embeddings)
        self.rotary = RotaryTables(rc, device)

    @staticmethod
    def context_limit(config) -> int:
        return int(config.max_position_embeddings)

    def lm_head_weight(self) -> torch.Tensor:
        if not self.dims.tie_word_embeddings:
            return self.lm_head.weight
        w, shard = self.model.embed_tokens.weight, self.vocab_shard
        return w if shard is None else w.narrow(0, shard.start, shard.size)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(input_ids, positions, kv_caches)
        cos, sin = self.rotary.lookup(positions)
        h = self.model.embed_tokens(input_ids)
        residual = None
        last = len(self.model.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            # Only the last layer may drop rows: every earlier one feeds the next layer's K/V.
            h, residual = layer(h, residual, cos, sin, kv_cache, meta, keep_rows if i == last else None)
        return self.model.norm(h, residual)[0]

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[MappedWeight]:
        if "rotary_emb." in name:  # some checkpoints store inv_freq; we recompute it
            return []
        if name.startswith("lm_head.") and self.dims.tie_word_embeddings:
            return []
        if name == "lm_head.weight" and self.vocab_shard is not None:
            return [(name, None, take(tensor, 0, self.vocab_shard))]
        module, _, kind = name.rpartition(".")
        prefix, _, proj = module.rpartition(".")
        if proj in ("o_proj", "down_proj"):
            return [(name, None, self.get_submodule(module).shard(kind, tensor))]
        if proj not in _FUSED:
            return [(name, None, tensor)]
        fused, index = _FUSED[proj]
        row, value = self.get_submodule(f"{prefix}.{fused}").shard(kind, tensor, index)
        return [(f"{prefix}.{fused}.{kind}", row, value)]


class MistralForCausalLM(LlamaForCausalLM):
    """Llama without biases. Sliding-window attention is not implemented, so the context is
    capped at the window, where full attention and windowed attention agree."""

    @staticmethod
    def context_limit(config) -> int:
        window = getattr(config, "sliding_window", None)
        limit = int(config.max_position_embeddings)
        return min(limit, int(window)) if window else limit


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on q/k/v (not on o)."""

    @classmethod
    def family_flags(cls, config) -> dict:
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)

    @staticmethod
    def context_limit(config) -> int:
        limit = int(config.max_position_embeddings)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", False) and window:
            return min(limit, int(window))
        return limit


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Llama with per-head RMSNorm on q and k before rope; `attention_bias` covers q/k/v/o."""

    @classmethod
    def family_flags(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
