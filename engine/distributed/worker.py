"""The loop of every rank but 0: receive the step's message, run the local forward pass
(its share of every layer, joining the model's all-reduces), wait for the next one.

Workers never sample and keep no request state: the block tables of the step come in the
message (`step_message`). They do compute their slice of the sampled rows' logits, which the
vocab-parallel LM head gathers. They build the same model shard and the same number of KV blocks
as rank 0 (`Communicator.min_int` over the ranks' budgets), with only their KV heads.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from engine.config import EngineConfig
from engine.distributed.process_group import RankInfo, connect, open_store, rank_device
from engine.startup import choose_num_blocks, configure_threads, resolve_device

logger = logging.getLogger("conveyor.engine")
PARENT_POLL_SECONDS = 0.5


def run_spawned_worker(config: EngineConfig, info: RankInfo, parent_pid: int) -> None:
    """Entry point of a worker the engine spawned (`launcher`)."""
    _exit_with_parent(parent_pid)
    store = open_store(info)
    store.set(f"joined/{info.rank}", "1")
    run_worker(config, info, store)


def run_torchrun_worker(config: EngineConfig) -> int:
    """Entry point of ranks 1..N-1 under torchrun (`conveyor serve` on those ranks)."""
    info = RankInfo.from_torchrun()
    if info is None or info.rank == 0:
        raise ValueError("run_torchrun_worker runs only on torchrun ranks other than 0")
    if info.world_size != config.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size ({config.tensor_parallel_size}) must equal torchrun's "
                         f"WORLD_SIZE ({info.world_size})")
    run_worker(config, info, open_store(info))
    return 0


def run_worker(config: EngineConfig, info: RankInfo, store) -> None:
    device = rank_device(resolve_device(config.device), info)
    configure_threads(config.num_threads, device)
    if info.spawned and device.type == "cpu" and config.num_threads is None:
        from engine.distributed.launcher import spawned_rank_threads

        torch.set_num_threads(spawned_rank_threads(info.world_size))
    comm = connect(info, store, device)
    # Imported after joining the group, so rank 0 is not kept waiting while transformers loads.
    from engine.model_runner import ModelRunner
    from engine.models.loader import load_hf_config, load_model, resolve_dtype, resolve_model

    source = resolve_model(config.model)
    hf_config = load_hf_config(source)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    model = load_model(source, hf_config, dtype, device, attention_backend=config.attention_backend,
                       load_format=config.load_format, seed=config.seed, tp=comm.tp_context(),
                       linear_backend=config.linear_backend)
    bytes_per_block = ModelRunner.kv_bytes_per_block(model, config.block_size, dtype)
    num_blocks = comm.min_int(choose_num_blocks(config, bytes_per_block, device))
    runner = ModelRunner(model, num_blocks, config.block_size, device, dtype, _NoSampling())
    while True:
        try:
            message = comm.broadcast_object()
        except RuntimeError as exc:  # rank 0 exited (its sockets closed): nothing left to serve
            logger.info("tensor-parallel rank %d: rank 0 is gone, exiting (%s)", info.rank,
                        str(exc).splitlines()[0][:160])
            return
        if message.shutdown:
            return
        runner.execute(message)  # the forward pass, and this rank's slice of the sampled rows' logits


class _NoSampling:
    """A worker's sampler: the logits it computed took part in the gather; rank 0 samples."""

    def __call__(self, logits, rows):
        from engine.sampler import SamplerOutput

        return SamplerOutput([], [], [])


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process as soon as its parent is gone (reparented), so
    a worker never outlives the engine even when the engine was killed outright."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="conveyor-parent-watch", daemon=True).start()
