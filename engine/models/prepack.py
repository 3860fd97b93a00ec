"""Which GEMM runs the linear layers, and packing the weights for oneDNN once after loading.

``linear_backend``: "torch" is `F.linear` (BLAS); "onednn" runs every projection and the LM
head through oneDNN with weights packed once (engine/kernels/onednn_linear.py); "cpu" runs the
projections through our own AVX2 GEMM (engine/kernels/cpu_gemm.py: rows bit-identical whatever
the batch) and the LM head through oneDNN; "auto" picks "cpu" for float32 on AVX2 CPUs where the
C++ extension is built (measured 1.01-1.7x faster than oneDNN at 1-2,048 rows, benchmarks/RESULTS.md;
on AVX-512 hosts oneDNN has wider kernels and the AVX2 kernel is unmeasured), else oneDNN for
float32 on CPU, and torch otherwise (GPUs, float16, bfloat16).
bfloat16 through oneDNN needs native bf16 kernels (AVX-512 BF16/AMX) and must be asked for: it
is not measured yet, and torch's bf16 matmul already calls oneDNN on such CPUs.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine.kernels import cpu_gemm, onednn_linear
from engine.models.greedy_head import GreedyHead
from engine.models.parallel_linear import PackableLinear

logger = logging.getLogger(__name__)

LINEAR_BACKENDS = ("auto", "cpu", "onednn", "torch")


def resolve_linear_backend(name: str, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """("cpu" | "onednn" | "torch", why). Raises ValueError naming ``linear_backend`` when "cpu"
    or "onednn" is asked for where it cannot run, or the name is unknown."""
    if name not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {name!r}")
    reason = onednn_linear.unsupported_reason(dtype, device)
    if name == "cpu":
        # the LM head stays on oneDNN, so "cpu" needs both
        why = cpu_gemm.unsupported_reason(dtype, device) or reason
        if why is not None:
            raise ValueError(f"linear_backend 'cpu' is not available: {why}")
        return "cpu", "asked for"
    if name == "onednn" and reason is not None:
        raise ValueError(f"linear_backend 'onednn' is not available: {reason}")
    if name == "torch":
        return "torch", "asked for"
    if reason is not None:
        return "torch", f"auto: {reason}"
    if name == "auto" and dtype != torch.float32:
        return "torch", "auto: oneDNN is picked for float32 only (bfloat16 not measured yet)"
    if name == "auto" and cpu_gemm.unsupported_reason(dtype, device) is None:
        if torch.backends.cpu.get_cpu_capability() == "AVX2":
            return "cpu", "auto: own AVX2 GEMM, weights packed once, faster than oneDNN and BLAS on CPU"
        # the kernel is AVX2 code, measured on AVX2 hosts only; here oneDNN has wider kernels
        return "onednn", (f"auto: weights packed once for oneDNN (this CPU's capability is "
                          f"{torch.backends.cpu.get_cpu_capability()}; the cpu GEMM is measured on AVX2 only)")
    return "onednn", "asked for" if name == "onednn" else "auto: weights packed once, faster than BLAS on CPU"


_STORED_NAMES = {torch.bfloat16: "bf16-stored (exact)", torch.float16: "fp16-stored (exact)",
                 torch.float32: "float32-stored"}


def drop_dense(module: nn.Module, name: str = "weight") -> None:
    """Replaces a parameter by a meta tensor of its shape and dtype: its memory is freed, and
    any code that still computed with it would fail loudly instead of reading stale values."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))


@torch.no_grad()
def prepack_linears(model: nn.Module, backend: str = "onednn") -> int:
    """Packs every projection's weight for `backend` ("onednn" or "cpu": engine/kernels/
    cpu_gemm.py, in bf16/fp16 panels where that holds the matrix exactly, logged) and the LM
    head for oneDNN; returns how many. Dense
    projection weights are dropped (they are not read again); the LM head keeps its dense
    weight when it is the embedding matrix (tied), which the embedding lookup still reads, or
    when the greedy head (engine/models/greedy_head.py) is built, which recomputes rows of it."""
    count = 0
    stored: dict[torch.dtype, list[int]] = {}  # own GEMM panels: storage dtype -> [count, bytes]
    for module in model.modules():
        if isinstance(module, PackableLinear) and module.packed is None and module.q4 is None:
            module.packed = module.pack_cpu() if backend == "cpu" else onednn_linear.pack(module.weight)
            drop_dense(module)
            count += 1
            if backend == "cpu":
                entry = stored.setdefault(module.packed.panels.dtype, [0, 0])
                entry[0] += 1
                entry[1] += module.packed.nbytes
    if stored:  # 16-bit panels hold the float32 weights exactly (cpu_gemm.pack checks each matrix)
        logger.info("own GEMM weights: %s", ", ".join(
            f"{n} {_STORED_NAMES[dtype]} ({size / (1 << 20):.0f} MiB)" for dtype, (n, size) in stored.items()))
    head = model.lm_head_weight()
    model.packed_lm_head = onednn_linear.pack(head)
    model.greedy_head = _build_greedy_head(model, head)
    lm_head = getattr(model, "lm_head", None)
    # the greedy head recomputes its candidates from the dense rows: an untied head keeps them
    if isinstance(lm_head, nn.Linear) and lm_head.weight is head and model.greedy_head is None:
        drop_dense(lm_head)
    return count + 1


def _build_greedy_head(model: nn.Module, head: torch.Tensor) -> GreedyHead | None:
    """The argmax-only head for greedy rows where it can run (float32 on CPU with fbgemm, the
    whole vocabulary on this process), else None; logs the choice and its memory."""
    if model.vocab_shard is not None or model.tp.size > 1:
        logger.info("greedy LM head: full float32 logits (tensor parallel: vocab-parallel head)")
        return None
    start = time.perf_counter()
    try:  # the constructor checks where screening can run (greedy_head.unsupported_reason)
        built = GreedyHead(head, model.compute_logits)
    except ValueError as exc:
        logger.info("greedy LM head: full float32 logits (%s)", exc)
        return None
    tied = not isinstance(getattr(model, "lm_head", None), nn.Linear) or model.lm_head.weight is not head
    kept = 0 if tied else head.numel() * head.element_size()
    logger.info("greedy LM head: int8 screening + exact float32 recompute, %.1f s, +%.0f MiB (int8 + float16 copies)%s",
                time.perf_counter() - start, built.nbytes / (1 << 20),
                "" if tied else f", +{kept / (1 << 20):.0f} MiB dense head kept (untied)")
    return built
