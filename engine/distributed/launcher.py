"""Rank 0's handle on its tensor-parallel group: joins torchrun's group, or spawns ranks
1..N-1 on this machine (torch.multiprocessing, spawn) and watches them.

Spawned workers are daemon processes that also poll their parent's pid, so they never outlive
the engine's process, however it ends. A worker that exits while starting fails the engine's
start-up with its exit code (its traceback is on the shared stderr); one that exits later is
seen by `check_alive` (process sentinels) before each step, and a pending collective fails at
once because its sockets closed.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import replace

import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.distributed.communicator import Communicator
from engine.distributed.process_group import STARTUP_TIMEOUT, RankInfo, connect, open_store, rank_device
from engine.distributed.step_message import StepMessage
from engine.startup import default_num_threads
from engine.step_failure import EngineFatalError

logger = logging.getLogger("conveyor.engine")


class WorkerGroup:
    """The communicator of rank 0 and, when it spawned them, the worker processes."""

    def __init__(self, comm: Communicator, processes: list, device: torch.device):
        self.comm = comm
        self.processes = processes
        self.device = device
        self.closed = False
        self._finalizer = weakref.finalize(self, _stop_processes, list(processes))

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device) -> "WorkerGroup":
        """Rank 0 of a group of `config.tensor_parallel_size` ranks; blocks until all joined."""
        size = config.tensor_parallel_size
        info = RankInfo.from_torchrun()
        if info is not None and info.world_size > 1:
            if info.world_size != size:
                raise ValueError(f"tensor_parallel_size ({size}) must equal torchrun's WORLD_SIZE ({info.world_size})")
            if info.rank != 0:
                raise ValueError("only torchrun's rank 0 runs the engine; the other ranks run the worker loop")
            store = open_store(info)
            device = rank_device(device, info)
            return cls(connect(info, store, device), [], device)
        if device.type == "cuda" and size > torch.cuda.device_count():  # rank i would use cuda:i
            raise ValueError(f"tensor_parallel_size ({size}) is more than the {torch.cuda.device_count()} CUDA "
                             f"device(s) of this machine (one rank per GPU; several machines: torchrun)")
        info = RankInfo(0, size, 0, "127.0.0.1", 0, spawned=True)
        if device.type == "cpu" and config.num_threads is None:  # the ranks share this machine's cores
            torch.set_num_threads(spawned_rank_threads(size))
        store = open_store(info)  # port 0: the OS picks a free one, no race with other engines
        info = replace(info, master_port=store.port)
        from engine.distributed.worker import run_spawned_worker

        ctx = mp.get_context("spawn")
        processes = [ctx.Process(target=run_spawned_worker, args=(config, replace(info, rank=r, local_rank=r), os.getpid()),
                                 name=f"conveyor-tp-rank{r}", daemon=True) for r in range(1, size)]
        for p in processes:
            p.start()
        try:
            _wait_joined(store, processes)
            device = rank_device(device, info)
            group = cls(connect(info, store, device), processes, device)
        except BaseException:
            _stop_processes(processes)
            raise
        logger.info("tensor parallel: %d ranks (%s), workers %s", size, "nccl" if device.type == "cuda" else "gloo",
                    [p.pid for p in processes])
        return group

    def check_alive(self) -> None:
        """Raises EngineFatalError naming the first spawned worker that has exited."""
        for rank, p in enumerate(self.processes, start=1):
            if not p.is_alive():
                raise EngineFatalError(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited "
                                       f"with code {p.exitcode}")

    def close(self) -> None:
        """Tells the workers to exit (best effort: some may be dead), then reaps them."""
        if self.closed:
            return
        self.closed = True
        try:
            if all(p.is_alive() for p in self.processes):
                self.comm.broadcast_object(StepMessage(shutdown=True))
        except RuntimeError:  # a worker is gone: the others see closed sockets and exit too
            pass
        _stop_processes(self.processes)


def _wait_joined(store, processes: list) -> None:
    """Waits until every spawned worker has announced itself in the store, failing at once
    (instead of at the rendezvous timeout) when one exits first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    pending = {rank: p for rank, p in enumerate(processes, start=1)}
    while pending:
        for rank, p in list(pending.items()):
            if store.check([f"joined/{rank}"]):
                del pending[rank]
            elif not p.is_alive():
                raise RuntimeError(f"tensor-parallel worker rank {rank} exited with code {p.exitcode} while "
                                   f"starting (its error is in the log above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel workers {sorted(pending)} did not start within "
                               f"{STARTUP_TIMEOUT.total_seconds():.0f} s")
        time.sleep(0.02)


def _stop_processes(processes: list, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def spawned_rank_threads(size: int) -> int:
    """CPU threads of each of `size` ranks spawned on one machine when none were asked for:
    the engine's default, shared out, at least one each."""
    return max(1, default_num_threads() // size)
