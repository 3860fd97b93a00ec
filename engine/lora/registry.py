"""The adapters loaded in CPU memory, by name.

Guarantees:
- ``add`` validates the whole adapter before anything changes; loading the same name from the
  same path again is a no-op (returns the loaded adapter); the same name from another path is
  refused (unload it first).
- ``max_cpu_loras`` (None: unbounded) caps how many adapters are loaded; past it ``add``
  refuses instead of silently dropping one that requests may still name.
- ``remove`` takes the name away at once (new requests naming it are refused), but an adapter
  that unfinished requests still use stays reachable by ``uid`` ("retired") until ``purge``
  is told no live request uses it: requests already queued or running finish on it.
"""
from __future__ import annotations

from collections.abc import Callable, Container

from engine.lora.adapter import LoRAAdapter
from engine.lora.errors import LoRAError
from engine.lora.request import LoRARequest


class LoRARegistry:
    def __init__(self, loader: Callable[[LoRARequest], LoRAAdapter], max_cpu_loras: int | None = None):
        self._loader = loader  # validates and reads one adapter (engine/lora/adapter.py)
        self.max_cpu_loras = max_cpu_loras
        self._by_name: dict[str, LoRAAdapter] = {}
        self._by_uid: dict[int, LoRAAdapter] = {}  # loaded and retired
        self._next_uid = 1

    def add(self, request: LoRARequest) -> LoRAAdapter:
        known = self._by_name.get(request.lora_name) if isinstance(request, LoRARequest) else None
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise LoRAError("lora_name", f"lora_name: adapter {request.lora_name!r} is already loaded from "
                                             f"{known.request.lora_path!r}; unload it first")
            return known
        if self.max_cpu_loras is not None and len(self._by_name) >= self.max_cpu_loras:
            raise LoRAError("lora_name", f"lora_name: {len(self._by_name)} adapters are loaded, the most "
                                         f"max_cpu_loras={self.max_cpu_loras} allows; unload one first")
        adapter = self._loader(request)
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        adapter = LoRAAdapter(adapter.request, adapter.rank, adapter.scaling, adapter.weights, uid)
        self._by_name[request.lora_name] = adapter
        self._by_uid[uid] = adapter
        return adapter

    def remove(self, name: str) -> LoRAAdapter | None:
        """Takes ``name`` away; its weights stay reachable by uid until `purge`."""
        return self._by_name.pop(name, None)

    def purge(self, live_uids: Container[int]) -> list[int]:
        """Forgets retired adapters no live request uses; returns their uids."""
        gone = [uid for uid, a in self._by_uid.items()
                if self._by_name.get(a.name) is not a and uid not in live_uids]
        for uid in gone:
            del self._by_uid[uid]
        return gone

    @property
    def has_retired(self) -> bool:
        return len(self._by_uid) > len(self._by_name)

    def get(self, name: str) -> LoRAAdapter | None:
        return self._by_name.get(name)

    def by_uid(self, uid: int) -> LoRAAdapter:
        return self._by_uid[uid]

    def list(self) -> list[LoRARequest]:
        """The loaded adapters' requests, in load order (a snapshot: safe to read from another
        thread while the engine thread changes the registry)."""
        return [a.request for a in list(self._by_name.values())]

    def __len__(self) -> int:
        return len(self._by_name)
