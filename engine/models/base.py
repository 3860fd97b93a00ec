"""The interface every model implements, and the weight-copying logic they share.

A model maps HF checkpoint tensor names onto its own parameters with `map_weight`; fused
projections (q/k/v, gate/up) receive each checkpoint tensor as a block of rows. `load_weights`
checks shapes and that every parameter was filled completely.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.kernels import onednn_linear
from engine.kernels.ops import rms_norm
from engine.models.greedy_head import GreedyHead
from engine.models.spec import KVCacheSpec
from engine.models.tensor_parallel import Shard, TPContext, materialize

# (our parameter name, first row it fills or None for the whole tensor, tensor to copy)
MappedWeight = tuple[str, "int | None", torch.Tensor]


class CausalLM(nn.Module):
    """A decoder-only language model that attends only through the paged KV cache.

    Subclasses set `kv_spec` and `max_model_len`, implement `forward`, `lm_head_weight` and
    `map_weight`.
    """

    kv_spec: KVCacheSpec
    max_model_len: int
    tp: TPContext = TPContext()
    # This rank's rows of a vocab-parallel LM head (tensor parallel); None: the head is whole.
    vocab_shard: Shard | None = None
    # `lm_head_weight()` packed for oneDNN by engine/models/prepack.py; None: F.linear on it
    packed_lm_head: torch.Tensor | None = None
    # argmax-only LM head for greedy rows (engine/models/greedy_head.py, built by prepack);
    # None: greedy rows take the full logits like every other row
    greedy_head: GreedyHead | None = None
    # what runs the linear layers and the attention (set by load_model; logged and in /metrics)
    linear_backend: str = "torch"
    attention_backend: str = ""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns final-normed hidden states [T, hidden_size] for the flat token batch, after
        writing every token's K/V into its slot of each layer's cache.

        ``keep_rows`` (int64 row indices into the flat batch): only those rows' hidden states
        are returned, in that order, [len(keep_rows), hidden_size]; every token's K/V is still
        written. A model may skip the other rows' work wherever no later token needs it (after
        the last layer's attention); their values are the same as without ``keep_rows``."""
        raise NotImplementedError

    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, hidden] output projection (the embedding matrix when tied); with a
        `vocab_shard`, this rank's rows of it."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]. With a vocab-parallel head every rank must
        call it with the same rows: each computes its slice of the vocabulary and all gather."""
        if self.packed_lm_head is not None:
            logits = onednn_linear.linear(hidden, self.packed_lm_head, None).float()
        else:
            logits = F.linear(hidden, self.lm_head_weight()).float()
        return logits if self.vocab_shard is None else self.tp.gather_last_dim(logits)

    def map_weight(self, name: str, tensor: torch.Tensor) -> list[MappedWeight]:
        """Where one checkpoint tensor goes; an empty list means it is not needed."""
        raise NotImplementedError

    def check_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list) -> None:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must be 1-D of equal length, got {tuple(input_ids.shape)} "
                f"and {tuple(positions.shape)}"
            )
        if len(kv_caches) != self.kv_spec.num_layers:
            raise ValueError(f"kv_caches must hold {self.kv_spec.num_layers} layers, got {len(kv_caches)}")

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (HF names) into the parameters, converting dtype.

        Raises ValueError on a shape mismatch, an unknown target, or parameters left unfilled.
        Parameters already on the meta device are held another way (engine/models/gguf_q4_1.py):
        they are neither expected nor filled.
        """
        params = {n: p for n, p in self.named_parameters() if p.device.type != "meta"}
        filled: dict[str, set[int]] = {}
        rows_filled: dict[str, int] = {}
        for hf_name, tensor in weights:
            for target, row, value in self.map_weight(hf_name, tensor):
                if target not in params:
                    raise ValueError(f"checkpoint weight {hf_name!r} maps to unknown parameter {target!r}")
                param = params[target]
                value = materialize(value)  # a lazily-read safetensors slice (tensor parallel)
                dst = param.data if row is None else param.data.narrow(0, row, value.shape[0])
                if dst.shape != value.shape:
                    raise ValueError(
                        f"checkpoint weight {hf_name!r} has shape {tuple(value.shape)}, "
                        f"expected {tuple(dst.shape)} for {target!r}"
                    )
                dst.copy_(value)
                start = 0 if row is None else row
                if start not in filled.setdefault(target, set()):
                    filled[target].add(start)
                    rows_filled[target] = rows_filled.get(target, 0) + dst.shape[0]
        missing = [n for n, p in params.items() if rows_filled.get(n, 0) < p.shape[0]]
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    @torch.no_grad()
    def init_dummy_weights(self, seed: int, std: float = 0.02) -> None:
        """Deterministic random weights: normal(0, std) matrices, unit norm scales, zero biases.
        Drawn on the CPU so that every device gets the same values for a seed."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.data.zero_()
            elif param.dim() == 1:  # norm scales
                param.data.fill_(1.0)
            else:
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                param.data.copy_(values)


class RMSNorm(nn.Module):
    """Holds an RMSNorm scale; the math (and the fused residual add) is `engine.kernels.ops`."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)
