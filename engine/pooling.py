"""Embeddings: a prompt's final hidden states (after the model's final norm) pooled into one
vector.

A pooling request is a prefill-only request: the scheduler runs its prompt through the same
steps as any other (chunked prefill, batched with generation requests, preempted and
recomputed like them) but never samples; each step the runner hands back the pooled part of
the chunk it computed (`pool_chunk`) and the request's `PoolingState` accumulates it. Once the
whole prompt is computed the request finishes with the vector.

Two pooling methods:
- ``mean`` (the default): the average of every position's hidden state. A causal LM not
  trained for embeddings (the default SmolLM2-135M-Instruct) puts next-token prediction into
  its last position; averaging over all positions is the more robust general-purpose sentence
  representation for such a model. It needs every position computed, so a mean-pooled request
  does not reuse prefix-cached blocks (`needs_all_positions`).
- ``last``: the last position's hidden state, what embedding-tuned causal LMs (e5-mistral,
  gte-Qwen) are trained for. It works with prefix caching (the last prompt token is always
  computed).

With ``normalize`` (the default) the vector is scaled to unit L2 norm, so a dot product is a
cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import InvalidParameterError

POOLING_METHODS = ("mean", "last")


@dataclass(frozen=True)
class PoolingParams:
    """How a pooling request turns hidden states into its embedding. Raises ValueError (with
    ``param``) on a bad value."""

    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_METHODS:
            raise InvalidParameterError("pooling", f"pooling must be one of {', '.join(POOLING_METHODS)}, "
                                                   f"got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise InvalidParameterError("normalize", f"normalize must be a boolean, got {self.normalize!r}")

    @property
    def needs_all_positions(self) -> bool:
        """True when every prompt position's hidden state is needed (no prefix-cache reuse)."""
        return self.pooling == "mean"


def pool_chunk(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """The part of one computed chunk (``hidden``: [tokens, hidden_size]) a `PoolingState`
    accumulates, in float32: the sum of its rows (mean) or its last row (last)."""
    if pooling == "mean":
        return hidden.float().sum(dim=0)
    return hidden[-1].to(torch.float32, copy=True)  # a copy: the runner may reuse `hidden`


@dataclass
class PoolingState:
    """One pooling request's running result. `add` takes each computed chunk's part in order;
    `reset` forgets everything (the request was preempted and will recompute from its first
    token). `result` is valid once every position was added."""

    params: PoolingParams
    _acc: torch.Tensor | None = field(default=None, repr=False)
    _count: int = 0  # positions added

    def add(self, part: torch.Tensor, num_tokens: int) -> None:
        if self.params.pooling == "mean":
            self._acc = part if self._acc is None else self._acc + part
        else:
            self._acc = part
        self._count += num_tokens

    def reset(self) -> None:
        self._acc, self._count = None, 0

    @property
    def num_positions(self) -> int:
        return self._count

    def result(self) -> list[float]:
        """The embedding as floats (on the host)."""
        if self._acc is None:
            raise RuntimeError("no hidden states were pooled")
        vec = self._acc / self._count if self.params.pooling == "mean" else self._acc
        if self.params.normalize:
            vec = torch.nn.functional.normalize(vec, p=2.0, dim=0)
        return vec.cpu().tolist()
