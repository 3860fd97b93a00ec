"""Where this process stands in a tensor-parallel group, and the process groups built from it.

Two ways in, one code path after: under ``torchrun`` (multi-node), RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment (`RankInfo.from_torchrun`);
otherwise the engine spawns ranks 1..N-1 on this machine itself and tells them the port of the
store rank 0 opened (`launcher`). Either way every rank builds the same two groups
(`communicator`) over a `TCPStore` at rank 0's address. There is no discovery of our own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.distributed.communicator import Communicator

STARTUP_TIMEOUT = timedelta(seconds=300)  # every rank reaches the rendezvous (imports included)
# A collective inside a forward pass waits at most this long for the slowest rank; past it the
# step fails and the engine goes down (a hung worker). Generous: one rank may be slow to start.
COMPUTE_TIMEOUT = timedelta(seconds=300)
IDLE_TIMEOUT = timedelta(days=3650)  # workers wait for the next step for as long as the engine idles

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    spawned: bool  # True: started by our launcher on one machine (loopback), False: torchrun

    @classmethod
    def from_torchrun(cls) -> "RankInfo | None":
        """The torchrun environment of this process, or None when not under torchrun."""
        if not all(v in os.environ for v in TORCHRUN_VARS):
            return None
        e = os.environ
        return cls(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e["LOCAL_RANK"]), e["MASTER_ADDR"],
                   int(e["MASTER_PORT"]), spawned=False)


def under_torchrun() -> bool:
    info = RankInfo.from_torchrun()
    return info is not None and info.world_size > 1


def open_store(info: RankInfo) -> dist.TCPStore:
    """Rank 0 hosts the store (port 0: any free port, read back from ``store.port``). Under
    torchrun, whose agent on node 0 already hosts a store at MASTER_ADDR:MASTER_PORT and says so
    in TORCHELASTIC_USE_AGENT_STORE (its default), every rank is a client of that one, as
    `torch.distributed`'s own env:// rendezvous does (asked to host it, rank 0 fails to bind,
    logs an [E] line that reads like a failure, and TCPStore falls back to a client)."""
    agent_store = not info.spawned and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(info.master_addr, info.master_port, info.world_size, info.rank == 0 and not agent_store,
                         timeout=STARTUP_TIMEOUT, wait_for_workers=False)


def _gloo(store, info: RankInfo, prefix: str, timeout: timedelta):
    opts = dist.ProcessGroupGloo._Options()
    # Spawned ranks talk over loopback; under torchrun gloo picks the interface of the host name
    # (GLOO_SOCKET_IFNAME overrides it, as for any torch.distributed job).
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if info.spawned
                     else dist.ProcessGroupGloo.create_default_device()]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), info.rank, info.world_size, opts)


def _nccl(store, info: RankInfo):
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = COMPUTE_TIMEOUT
    return dist.ProcessGroupNCCL(dist.PrefixStore("compute/", store), info.rank, info.world_size, opts)


def connect(info: RankInfo, store: dist.TCPStore, device: torch.device) -> Communicator:
    """Builds this rank's groups; blocks until every rank has joined (STARTUP_TIMEOUT)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        compute = _nccl(store, info)
    else:
        compute = _gloo(store, info, "compute/", COMPUTE_TIMEOUT)
    control = _gloo(store, info, "control/", IDLE_TIMEOUT)
    return Communicator(info.rank, info.world_size, compute, control, store)


def rank_device(device: torch.device, info: RankInfo) -> torch.device:
    """The device this rank computes on: its own GPU (cuda:LOCAL_RANK), or the CPU."""
    return torch.device("cuda", info.local_rank) if device.type == "cuda" else device
