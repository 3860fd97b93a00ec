"""Decisions made once when an engine starts: device, compute dtype and thread count for the
host, KV cache size, stop tokens. Each choice that depends on the host is logged with its reason."""
from __future__ import annotations

import glob
import logging
import os

import torch

from engine.config import EngineConfig

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB: plenty for small models, modest next to 24 GiB of RAM
CUDA_KV_FRACTION = 0.8  # of the GPU memory still free after the weights are loaded

logger = logging.getLogger("conveyor.engine")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (x86 "flags", Arm "Features"); empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> tuple[bool, str]:
    """Whether bf16 matmuls are fast on this CPU, and why. They are where oneDNN has bf16 kernels
    for the ISA: AVX-512 BF16 or AMX on x86, the BF16 extension on Arm. Elsewhere (AVX2-only
    hosts, plain AVX-512) torch falls back to generic code, measured 4-5x slower than fp32."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    flags = cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if onednn and native:
        return True, f"the CPU has {'/'.join(native)} and oneDNN bf16 kernels"
    return False, (f"the CPU ({capability}) has no native bf16 matmul kernels"
                   f"{'' if onednn else ' in oneDNN'}; bf16 would run a 4-5x slower fallback")


def choose_cpu_dtype(declared: torch.dtype | None) -> tuple[torch.dtype, str]:
    """The compute dtype for `dtype="auto"` on CPU given the checkpoint's declared dtype (None
    when it names none, as GGUF files): fp32 stays fp32; half precision becomes bf16 where the
    CPU has fast bf16 kernels and fp32 otherwise (fp16 matmuls are slow on every CPU)."""
    if declared == torch.float32:
        return torch.float32, "the checkpoint is float32"
    fast, why = cpu_has_fast_bf16()
    return (torch.bfloat16 if fast else torch.float32), why


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once), capped
    by a cgroup CPU quota; os.cpu_count() when the topology is unreadable."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f1, open(f"{base}/core_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = len(cores) or (os.cpu_count() or 1)
    for path in glob.glob("/sys/fs/cgroup/cpu.max"):
        try:
            quota, period = open(path).read().split()[:2]
            if quota != "max":
                count = min(count, max(1, int(int(quota) // int(period))))
        except (OSError, ValueError):
            pass
    return max(1, count)


def default_num_threads() -> int:
    """One thread per physical core, less one core left to Python (scheduling, detokenizing, the
    HTTP server), as vLLM's CPU backend reserves one; at least one. SMT siblings are not counted:
    they slow matmuls down. On a 2-core machine that is 1 thread, which measured ~10x faster than
    2 whenever other processes compete for the cores (every parallel region waits for its slowest
    thread; benchmarks/RESULTS.md)."""
    return max(1, physical_cores() - 1)


def configure_threads(requested: int | None, device: torch.device) -> int:
    """Sets torch's CPU thread count: `requested` when given, else `default_num_threads()` on
    CPU. On a GPU the count is left to torch. Returns the count in force."""
    if requested:
        torch.set_num_threads(requested)
        logger.info("CPU threads: %d (asked for)", requested)
    elif device.type == "cpu":
        cores = physical_cores()
        torch.set_num_threads(default_num_threads())
        logger.info("CPU threads: %d (%d physical cores, one left to Python and the server; "
                    "--num-threads to change)", torch.get_num_threads(), cores)
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def choose_num_blocks(config: EngineConfig, bytes_per_block: int, device: torch.device) -> int:
    """`config.num_blocks`, else as many blocks as the KV memory budget holds (logged)."""
    num_blocks = config.num_blocks
    if num_blocks is None:
        budget = config.kv_cache_memory
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * CUDA_KV_FRACTION)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        num_blocks = int(budget // bytes_per_block)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block (one block needs {bytes_per_block} bytes)"
            )
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)", num_blocks, config.block_size,
                num_blocks * config.block_size, num_blocks * bytes_per_block / (1 << 20))
    return num_blocks


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
