"""The collectives the engine uses, on explicit process-group objects (no torch.distributed
global state, so several engines, or a test's reference engine, can live in one process).

Two groups over the same ranks: ``compute`` (nccl on CUDA, gloo on CPU) carries the model's
all-reduces and has a finite timeout, so a hung rank fails the step instead of hanging it;
``control`` (always gloo, CPU objects) carries the per-step message and has a very long timeout,
because a worker waits in it for as long as the engine is idle. A rank that dies closes its
sockets, so the other ranks' pending gloo collectives fail at once ("Connection closed by peer").
"""
from __future__ import annotations

import pickle
from typing import Any

import torch

from engine.models.tensor_parallel import TPContext


class Communicator:
    def __init__(self, rank: int, world_size: int, compute: Any, control: Any, store: Any = None):
        self.rank = rank
        self.world_size = world_size
        self.compute = compute
        self.control = control
        self.store = store  # kept alive: the groups rendezvoused through it

    def tp_context(self) -> TPContext:
        return TPContext(self.rank, self.world_size, self.compute)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends `obj` (pickled) to every rank; every rank returns it. Two gloo
        broadcasts: the length, then the bytes."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                                       dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.control.broadcast(size, 0).wait()
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.control.broadcast(payload, 0).wait()
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (ranks agree on one KV cache size)."""
        t = torch.tensor([value], dtype=torch.int64)
        self.control.allreduce([t], torch.distributed.ReduceOp.MIN).wait()
        return int(t.item())
