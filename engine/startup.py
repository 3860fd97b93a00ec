"""Decisions made once when an engine starts: device, KV cache size, stop tokens."""
from __future__ import annotations

import torch

from engine.config import EngineConfig

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB: plenty for small models, modest next to 24 GiB of RAM
CUDA_KV_FRACTION = 0.8  # of the GPU memory still free after the weights are loaded


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def choose_num_blocks(config: EngineConfig, bytes_per_block: int, device: torch.device) -> int:
    if config.num_blocks is not None:
        return config.num_blocks
    budget = config.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * CUDA_KV_FRACTION)
        else:
            budget = DEFAULT_CPU_KV_BYTES
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes holds no KV block (one block needs {bytes_per_block} bytes)"
        )
    return int(num_blocks)


def eos_token_ids(hf_config, tokenizer) -> set[int]:
    """Every id that ends generation: the config's eos (int or list) and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
