"""Runs one scheduled step through the model: builds the flat batch, runs the forward pass over
the paged KV cache, and samples the next token of every sequence whose prompt is complete.

The runner owns the KV cache tensors (one per layer). Every token of a step, prefill chunks and
decodes alike, goes through a single forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention_metadata import AttentionMetadata
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.sampler import Sampler, SamplerOutput, SamplingRow
from engine.scheduler.request import Request
from engine.scheduler.scheduler import SchedulerOutput


@dataclass
class StepResult:
    """Requests that sampled a token this step, in the same order as ``sampled``'s rows."""

    requests: list[Request]
    sampled: SamplerOutput | None
    num_tokens: int


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: KVCacheManager, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, sampler: Sampler, cuda_graph_batch: int = 0,
                 max_model_len: int = 0):
        """``cuda_graph_batch`` > 0 captures CUDA graphs for decode steps of up to that many
        sequences (CUDA with the Triton backend only)."""
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        spec = model.kv_spec
        shape = spec.layer_shape(num_blocks, block_size)
        # zeros, not empty: the attention reads masked-out slots, and NaN * 0 would still be NaN
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.graphs = None
        if cuda_graph_batch > 0:
            from engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, self.kv_caches, block_size, max_model_len, cuda_graph_batch, device)

    @staticmethod
    def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        return model.kv_spec.bytes_per_token(dtype) * block_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        # Decodes (one new token) first, as AttentionMetadata requires; stable otherwise.
        items = sorted(out.scheduled, key=lambda item: item[1] != 1)
        input_ids: list[int] = []
        query_lens, seq_lens, block_tables = [], [], []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        for i, (request, n) in enumerate(items):
            start = request.num_computed_tokens
            input_ids.extend(request.all_token_ids[start : start + n])
            query_lens.append(n)
            seq_lens.append(start + n)
            block_tables.append(self.kv.block_ids(request.request_id))
            if start + n == request.num_tokens:  # prompt (or recompute) complete: sample
                sample_rows.append(i)
                sample_requests.append(request)
        meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(ids, meta)
        else:
            hidden = self.model(ids, meta.positions, self.kv_caches, meta)
        if not sample_requests:
            return StepResult([], None, meta.num_tokens)
        last_token = meta.query_start_loc[1:].to(torch.long) - 1
        logits = self.model.compute_logits(hidden[last_token[sample_rows]])
        rows = [
            SamplingRow(
                params=r.sampling_params,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids,
                generator=r.generator,
            )
            for r in sample_requests
        ]
        return StepResult(sample_requests, self.sampler(logits, rows), meta.num_tokens)
