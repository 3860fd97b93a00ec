"""Linear layers on CPU through oneDNN, with each weight reordered ("prepacked") once at load.

`torch.nn.functional.linear` on CPU calls a BLAS GEMM that repacks the weight on every call;
oneDNN's matmul keeps the weight in its own blocked layout and reuses it. On a 2-core AVX2 EPYC
(float32, 1 thread) that measured 1.1-1.5x faster at decode row counts (16-32 rows) and
1.03-1.09x at 2,048-row prefill chunks (benchmarks/RESULTS.md, issue 13), which is what vLLM's
CPU backend does for its linear layers too. Results agree with `F.linear` to float32 rounding
(summation order differs), not bit for bit.

oneDNN builds one "primitive" per input shape and keeps it in a cache (about 1 ms to build);
the scheduler produces many row counts, so the cache is made large enough to hold them all.
"""
from __future__ import annotations

import os

import torch

# Row counts seen by a server: decode batches up to max_num_seqs and prefill chunks up to
# max_num_batched_tokens, times ~5 weight shapes. The default (1,024) would thrash.
_PRIMITIVE_CACHE = "8192"


def unsupported_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """None when `pack`/`linear` work for weights of `dtype` on `device`; otherwise why not."""
    if device.type != "cpu":
        return f"oneDNN linears run on CPU only, not {device.type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN (mkldnn) linear"
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return f"oneDNN has no native {str(dtype).removeprefix('torch.')} matmul on this CPU"


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight in oneDNN's layout (an opaque mkldnn tensor; a copy)."""
    # Read by oneDNN when its cache is first used, so set before the first reorder
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", _PRIMITIVE_CACHE)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) for x [..., in], with W packed by `pack`."""
    if x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    lead = x.shape[:-1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias, "none", [], "")
    return y.reshape(*lead, y.shape[-1])
