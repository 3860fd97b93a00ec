"""`LoRARequest`: which adapter a request runs with (vLLM's field names)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, with the client's integer id and the folder it loads from.

    ``lora_name`` is the identity the engine keys adapters by (a request names its adapter by
    it); ``lora_int_id`` is kept for API compatibility and shown back, never used as a key;
    ``lora_path`` is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path
