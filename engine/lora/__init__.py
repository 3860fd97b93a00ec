"""Multi-LoRA serving, the engine side (issue 15). Many PEFT adapters on one base model, with
requests of different adapters and of the base model batched together in one forward pass.

    from engine import LLM, SamplingParams
    from engine.lora import LoRARequest
    llm = LLM(model_dir, enable_lora=True, max_loras=2, max_lora_rank=16)
    outs = llm.generate(prompts, SamplingParams(), lora_request=LoRARequest("sql", 1, "/adapters/sql"))

The path of an adapter (one concept per file):

* `request.py`: `LoRARequest(lora_name, lora_int_id, lora_path)`; the name is the key.
* `adapter.py`: reads a PEFT folder into CPU memory and validates it against the model
  (`LoRAError` naming the field: bad ``lora_path``, ``rank`` above ``max_lora_rank``,
  ``target_modules`` the model lacks, ``base_model_name_or_path`` mismatch, unsupported keys such
  as ``modules_to_save`` or ``use_dora``). Scaling is alpha / r (alpha / sqrt(r) with rsLoRA).
* `targets.py`: which projections an adapter may target per architecture (Llama family:
  q/k/v/o/gate/up/down; GPT-2: c_attn/c_proj/c_fc) and the column slice of our fused modules
  (``qkv_proj``, ``gate_up_proj``) each one writes.
* `registry.py`: the loaded adapters by name (``max_cpu_loras``, None = unbounded: past it
  loading is refused, never silently evicted). Unloading takes the name away at once; requests
  already queued or running on it finish on it (its weights are dropped when the last one ends).
* `slots.py`: ``max_loras`` device slots, stacked per layer and projection (A [S, R, in],
  B [S, out, R], ranks zero-padded to R), loaded from CPU on demand, least recently used evicted
  among slots the step does not need.
* `layers.py`: `LoRALinear` wraps the model's projection modules by name (the model files are
  not edited) and adds the delta with `engine.kernels.lora_ops.add_lora`.
* `manager.py`: `LoRAManager` ties them together; the runner calls ``set_step`` with each
  scheduled sequence's adapter before the forward pass.
* `engine_adapters.py`: `EngineAdapters`, what `LLMEngine` sees: the manager, or the
  refusals when LoRA is disabled; frees unloaded adapters once their last request has left.

Elsewhere: `ScheduledRequest.lora_id` (the adapter's engine uid) carries a sequence's adapter to
the runner; the scheduler never runs more distinct adapters at once than ``max_loras`` (a request
whose adapter has no slot free waits; later requests may pass it at most ``max_num_seqs`` times,
then admission pauses until a running adapter drains, so none starves); the adapter's uid is part of the prefix-cache salt, so different adapters (and
two loads of one name) never share KV blocks while requests of one adapter do. LoRA with
tensor parallelism is refused; CUDA graphs are not used when LoRA is enabled.
"""
from __future__ import annotations

from engine.lora.errors import LoRAError
from engine.lora.request import LoRARequest

__all__ = ["LoRAError", "LoRARequest"]
