"""Projections whose GGUF weights are Q4_1 run straight from those blocks.

A GGUF file's Q4_1 weights (the default model's linears all are) used to be dequantized to
float32 at load and packed for the float32 GEMM: 4 bytes a weight, 425 MB for SmolLM2-135M's
projections, all streamed from memory by every decode step. The Q4_1 kernel
(engine/kernels/q4_linear.py) reads the blocks themselves, 5 bits a weight, turns each code into
exactly the float32 value gguf's dequantization gives and sums in the float32 GEMM's order: the
same bits as before, at any batch size, from a sixth of the memory.
"""
from __future__ import annotations

import logging
import time

import torch

from engine.kernels import q4_linear
from engine.models.gguf_weights import GGUFFile
from engine.models.parallel_linear import PackableLinear
from engine.models.prepack import drop_dense

logger = logging.getLogger(__name__)


def why_not(model, device: torch.device) -> str | None:
    """None when projections of `model` can run from Q4_1 blocks; otherwise why not."""
    if model.tp.size > 1:
        return "tensor parallel shards are cut from the float32 weights"
    if next(model.parameters()).dtype != torch.float32:
        return "the Q4_1 kernel computes in float32 only"
    return q4_linear.unsupported_reason(torch.device(device))


@torch.no_grad()
def attach_q4_1(model, gguf_file: GGUFFile, device) -> set[str]:
    """Gives every projection whose checkpoint tensors are all Q4_1 those blocks packed (``q4``,
    in the layer's row order) and drops its dense weight (a meta tensor: never allocated, and
    `load_weights` no longer expects it); returns the HF names of the tensors it took, which the
    float32 load then skips. A fused projection (q/k/v, gate/up) qualifies only when every part
    is Q4_1; the others keep their weights."""
    from gguf import GGMLQuantizationType

    reason = why_not(model, device)
    if reason is not None:
        logger.info("Q4_1 weights: dequantized to float32 (%s)", reason)
        return set()
    start = time.perf_counter()
    parts: dict[str, list[tuple[int, torch.Tensor, str]]] = {}
    for name, raw, cols in gguf_file.blocks(GGMLQuantizationType.Q4_1):
        # Where this tensor's float32 rows went: map_weight on a stand-in of its shape.
        for param, row, _ in model.map_weight(name, torch.empty(raw.shape[0], cols, device="meta")):
            module_name, _, kind = param.rpartition(".")
            if kind == "weight":
                parts.setdefault(module_name, []).append((row or 0, raw, name))
    taken: set[str] = set()
    count = nbytes = 0
    for module_name, blocks in parts.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, PackableLinear) or sum(raw.shape[0] for _, raw, _ in blocks) != module.out_features:
            continue  # not a projection, or part of the fusion is stored in another type
        whole = torch.empty(module.out_features, blocks[0][1].shape[1], dtype=torch.uint8)
        for row, raw, name in blocks:
            whole[row: row + raw.shape[0]] = raw
            taken.add(name)
        module.q4 = q4_linear.pack_q4_1(whole)
        drop_dense(module)
        count += 1
        nbytes += module.q4.nbytes
    logger.info("Q4_1 weights: %d projections run from their GGUF blocks (%.0f MiB, %.1f s)",
                count, nbytes / (1 << 20), time.perf_counter() - start)
    return taken
