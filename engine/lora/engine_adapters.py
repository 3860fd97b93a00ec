"""`EngineAdapters`: the engine's side of multi-LoRA, whether LoRA is enabled or not.

Guarantees: with LoRA disabled (no `LoRAManager`) naming an adapter is refused with a
`LoRAError` naming the field (``model`` on a request, ``lora_name`` on a load), unloading
answers False and listing gives []. With it enabled, an unloaded adapter's weights are freed
only once no request the scheduler still holds uses it (``purge``, called between steps).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.lora.errors import LoRAError
from engine.lora.request import LoRARequest


class EngineAdapters:
    def __init__(self, manager: Any = None):
        self.manager = manager  # engine.lora.manager.LoRAManager, or None: LoRA is disabled

    @classmethod
    def build(cls, config: Any, model: Any, hf_config: Any, dtype: Any, device: Any) -> "EngineAdapters":
        """Wraps the model's projections when ``config.enable_lora``, else a disabled set."""
        if not config.enable_lora:
            return cls()
        from engine.lora.manager import LoRAManager  # loads the LoRA kernels only when enabled

        return cls(LoRAManager(model, hf_config.to_dict(), max_loras=config.max_loras,
                               max_lora_rank=config.max_lora_rank, max_cpu_loras=config.max_cpu_loras,
                               dtype=dtype, device=device))

    def resolve(self, lora_request: LoRARequest | None) -> tuple[str | None, int | None]:
        """(adapter name, engine uid) of a request's adapter, (None, None) for the base model."""
        if lora_request is None:
            return None, None
        if self.manager is None:
            raise LoRAError("model", "model: LoRA adapters are not enabled on this engine (enable_lora=False)")
        adapter = self.manager.resolve(lora_request)
        return adapter.name, adapter.uid

    def add(self, lora: LoRARequest) -> None:
        if self.manager is None:
            raise LoRAError("lora_name", "lora_name: LoRA adapters are not enabled on this engine (enable_lora=False)")
        self.manager.add(lora)

    def remove(self, lora_name: str, live: Iterable[Any]) -> bool:
        """Unloads ``lora_name``; ``live``: the requests the scheduler holds. False if unknown."""
        if self.manager is None or not self.manager.remove(lora_name):
            return False
        self.purge(live)
        return True

    def list(self) -> list[LoRARequest]:
        return [] if self.manager is None else self.manager.list()

    def purge(self, live: Iterable[Any]) -> None:
        """Frees unloaded adapters none of the ``live`` requests uses any more (``live`` is read
        only when some adapter is waiting to be freed)."""
        if self.manager is not None and self.manager.has_retired:
            self.manager.purge({r.lora_id for r in live})

    @staticmethod
    def names(requests: Iterable[Any]) -> list[str]:
        """The distinct adapters the requests run with, sorted."""
        return sorted({r.lora_name for r in requests if r.lora_name})
