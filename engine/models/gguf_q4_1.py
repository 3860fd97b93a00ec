"""Projections whose GGUF weights are Q4_1 also keep those blocks, for small batches.

A decode step of a few sequences streams every weight once and does little arithmetic with
it, so its time is the weights' bytes: 4 a weight as float32 panels, 0.625 as Q4_1 blocks (the
default model's linears are all Q4_1). The Q4_1 kernel (engine/kernels/q4_1_linear.py) turns
each code into the float32 value gguf's dequantization gives and sums in the float32 GEMM's
order, so a row's result has the same bits whichever of the two ran it: a request's output
still never depends on the batch it was scheduled in. Steps of more rows than
`PackableLinear.Q4_MAX_ROWS` keep the float32 panels, where arithmetic, not bytes, sets the time.
"""
from __future__ import annotations

import logging
import time

import torch

from engine.kernels import cpu_gemm, q4_1_linear
from engine.models.gguf_weights import iter_gguf_blocks
from engine.models.parallel_linear import PackableLinear

logger = logging.getLogger(__name__)
Q4_1 = 3  # gguf.GGMLQuantizationType.Q4_1


def why_not(model, device: torch.device) -> str | None:
    """None when the Q4_1 blocks can be attached to `model`; otherwise why not."""
    if model.tp.size > 1:
        return "tensor parallel shards are cut from the float32 weights"
    if getattr(model, "linear_backend", "") != "cpu":
        return "bit-identity holds against the own float32 GEMM (linear backend cpu) only"
    return q4_1_linear.unsupported_reason(torch.device(device))


@torch.no_grad()
def attach_q4_1(model, gguf_path: str, hf_config, device, cache_dir: str | None = None) -> int:
    """Gives every projection whose checkpoint tensors are all Q4_1 a packed copy of those
    blocks (``q4``), in the layer's row order; returns how many. Fused projections (q/k/v,
    gate/up) get it only when every part is Q4_1."""
    reason = why_not(model, device)
    if reason is not None:
        logger.info("Q4_1 weights: float32 panels only (%s)", reason)
        return 0
    start = time.perf_counter()
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, raw, cols in iter_gguf_blocks(gguf_path, hf_config, Q4_1, cache_dir):
        # Where the float32 rows of this tensor went: map_weight on a stand-in of its shape.
        for param, row, _ in model.map_weight(name, torch.empty(raw.shape[0], cols, device="meta")):
            module_name, _, kind = param.rpartition(".")
            if kind == "weight":
                parts.setdefault(module_name, []).append((row or 0, raw))
    count = nbytes = 0
    for module_name, blocks in parts.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, PackableLinear) or not isinstance(module.packed, cpu_gemm.CpuPackedWeight):
            continue
        if sum(raw.shape[0] for _, raw in blocks) != module.out_features:
            continue  # part of the fusion is stored in another type
        whole = torch.empty(module.out_features, blocks[0][1].shape[1], dtype=torch.uint8)
        for row, raw in blocks:
            whole[row: row + raw.shape[0]] = raw
        module.q4 = q4_1_linear.pack(whole)
        count += 1
        nbytes += module.q4.nbytes
    logger.info("Q4_1 weights: %d projections also keep their GGUF blocks (%.0f MiB, %.1f s) for steps of "
                "<= %d rows", count, nbytes / (1 << 20), time.perf_counter() - start, PackableLinear.Q4_MAX_ROWS)
    return count
