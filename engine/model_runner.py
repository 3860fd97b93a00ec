"""Runs one scheduled step through the model: builds the flat batch, runs the forward pass over
the paged KV cache, and samples the next token of every sequence the scheduler marked
``sample``.

The runner owns the KV cache tensors (one per layer) and reads nothing but the
`SchedulerOutput`: token ids, positions and block tables come from it, never from the KV cache
manager. Every token of a step, prefill chunks and decodes alike, goes through a single forward
pass. Embedding (pooling) sequences sample nothing: the runner hands back their chunk's pooled
final hidden states instead.
"""
from __future__ import annotations

import itertools
import math

import torch

from engine.attention_metadata import AttentionMetadata
from engine.block_table_buffer import BlockTableBuffer
from engine.pooling import pool_chunk
from engine.sampler import Sampler, SamplerOutput, SamplingRow
from engine.scheduler.output import SampledTokens, SchedulerOutput


def reads_only_written_slots(model: torch.nn.Module, device: torch.device) -> bool:
    """True when the model's attention backends are all the C++ CPU kernel, which never reads
    a K/V slot past a sequence's context (so never one no step has written)."""
    names = {m.backend.name for m in model.modules() if hasattr(getattr(m, "backend", None), "name")}
    return torch.device(device).type == "cpu" and names == {"cpu"}


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, sampler: Sampler, cuda_graph_batch: int = 0,
                 max_model_len: int = 0, lora=None):
        """``cuda_graph_batch`` > 0 captures CUDA graphs for decode steps of up to that many
        sequences (CUDA with the Triton backend only). ``lora`` is the model's `LoRAManager`
        (engine/lora/) when LoRA is enabled: each step's sequences' adapters are set on it
        before the forward pass."""
        self.model = model
        self.lora = lora
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        spec = model.kv_spec
        shape = spec.layer_shape(num_blocks, block_size)
        # Only where every attention backend reads nothing but slots already written (the C++
        # CPU kernel reads positions < seq_len of each sequence) is the cache left uninitialised:
        # its pages are then touched only when K/V is written, so the process's RSS grows with
        # the KV the workload uses instead of the whole budget at start. The torch and Triton
        # paths load padded (masked) slots, where garbage could be NaN and NaN * 0 stays NaN.
        alloc = torch.empty if reads_only_written_slots(model, device) else torch.zeros
        self.kv_caches = [alloc(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.block_tables = BlockTableBuffer()  # persistent rows: only new block ids written per step
        self.graphs = None
        if cuda_graph_batch > 0:
            from engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, self.kv_caches, block_size, max_model_len, cuda_graph_batch, device)

    @staticmethod
    def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        return model.kv_spec.bytes_per_token(dtype) * block_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> SampledTokens:
        """Computes the step and returns one sampled token per sequence with ``sample`` set, in
        batch order (decodes first)."""
        # Decodes (one new token) first, as AttentionMetadata requires; stable otherwise.
        items = sorted(out.scheduled, key=lambda s: len(s.token_ids) != 1)
        input_ids: list[int] = []
        query_lens, seq_lens, block_tables = [], [], []
        sample_rows: list[int] = []
        for i, s in enumerate(items):
            n = len(s.token_ids)
            input_ids.extend(s.token_ids)
            query_lens.append(n)
            seq_lens.append(s.num_computed_tokens + n)
            block_tables.append(s.block_ids)
            if s.sample:
                sample_rows.append(i)
        table = self.block_tables.rows([s.request_id for s in items], block_tables)
        meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, self.block_size, self.device, table)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        if self.lora is not None:  # token -> adapter slot mapping, in the flat batch's order
            self.lora.set_step([(s.lora_id, len(s.token_ids)) for s in items])
        keep = self._rows_to_keep(items, sample_rows, query_lens, len(input_ids))
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(ids, meta)
        else:
            hidden = self.model(ids, meta.positions, self.kv_caches, meta, keep_rows=keep)
        pooled = self._pool(items, hidden, meta)
        if not sample_rows:
            return SampledTokens(pooled=pooled)
        if keep is not None:  # the model returned just the sampled rows, in order
            sampled_hidden = hidden
        else:
            last_token = meta.query_start_loc[1:].to(torch.long) - 1
            sampled_hidden = hidden[last_token[sample_rows]]
        sampling = [items[i] for i in sample_rows]
        rows = [SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids, s.generator, s.grammar)
                for s in sampling]
        head = getattr(self.model, "greedy_head", None)
        only_argmax = self.sampler.needs_only_argmax(rows) if head is not None else []
        if any(only_argmax):
            result = self._sample_with_greedy_head(head, sampled_hidden, rows, only_argmax)
        else:
            result = self.sampler(self.model.compute_logits(sampled_hidden), rows)
        return SampledTokens([s.request_id for s in sampling], result.token_ids, result.logprobs,
                             result.chosen_logprobs, pooled)

    def _rows_to_keep(self, items: list, sample_rows: list[int], query_lens: list[int],
                      num_tokens: int) -> torch.Tensor | None:
        """The flat-batch rows whose final hidden state is read: each sampled sequence's last
        token. None where every row is read anyway (decodes only), or where something needs
        all rows (pooling reads whole chunks; LoRA maps adapters onto every token's row)."""
        if len(sample_rows) == num_tokens or self.lora is not None or any(s.pooling for s in items):
            return None
        ends = list(itertools.accumulate(query_lens))
        return torch.tensor([ends[i] - 1 for i in sample_rows], dtype=torch.long, device=self.device)

    def _sample_with_greedy_head(self, head, hidden: torch.Tensor, rows: list[SamplingRow],
                                 only_argmax: list[bool]) -> SamplerOutput:
        """Rows that need only the argmax take it from the greedy head (no full logits); the
        others go through the full logits and the sampler as usual. Batch order is kept; the
        greedy rows' logprobs are None and their chosen logprobs NaN (none were asked for)."""
        n = len(rows)
        tokens, logprobs, chosen = [0] * n, [None] * n, [math.nan] * n
        greedy = [i for i in range(n) if only_argmax[i]]
        for i, t in zip(greedy, head.argmax(hidden[greedy]).tolist()):
            tokens[i] = t
        rest = [i for i in range(n) if not only_argmax[i]]
        if rest:
            out = self.sampler(self.model.compute_logits(hidden[rest]), [rows[i] for i in rest])
            for j, i in enumerate(rest):
                tokens[i], logprobs[i], chosen[i] = out.token_ids[j], out.logprobs[j], out.chosen_logprobs[j]
        return SamplerOutput(tokens, logprobs, chosen)

    @staticmethod
    def _pool(items: list, hidden: torch.Tensor, meta: AttentionMetadata) -> dict[str, torch.Tensor]:
        """Each pooling sequence's part of this step's chunk (engine/pooling.py)."""
        if not any(s.pooling for s in items):
            return {}
        starts = meta.query_start_loc.tolist()
        return {s.request_id: pool_chunk(hidden[starts[i]:starts[i + 1]], s.pooling)
                for i, s in enumerate(items) if s.pooling}
