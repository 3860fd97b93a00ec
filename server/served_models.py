"""The models a server serves: one `ModelHandle` per model (its config, engine, service and
metrics), and `ModelSet`, the one place where a request's model name is resolved. A LoRA
adapter is served like a model: its handle is its base model's with `lora` set (the engine's
`LoRARequest`) and `parent` pointing at the base; it is named, allowed and priced on its own
name (at the base model's prices and version).

Guarantees: `ModelSet.lookup` answers 404 for an unknown name, 403 for a model the tenant may
not use and 503 for an optional model that failed to load, and nothing else ever resolves a name; models keep the config's order (small to
large), the first being the default.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from engine.async_engine import AsyncEngine
from server.config_file import ModelConfig, TenantConfig
from server.errors import APIError
from server.metrics import ModelMetrics
from server.serving import ModelService


@dataclass
class ModelHandle:
    """One served model. `config` is None for the model of a server started without a config
    file (then it is named by `--served-model-name` or its checkpoint, and costs nothing)."""

    config: ModelConfig | None
    engine: AsyncEngine
    service: ModelService
    metrics: ModelMetrics
    _tokenizer_fp: str | None = field(default=None, repr=False)
    lora: Any = None  # engine.lora LoRARequest: this handle serves that adapter on `parent`'s engine
    parent: "ModelHandle | None" = None

    @property
    def name(self) -> str:
        if self.lora is not None:
            return self.lora.lora_name
        return self.config.name if self.config is not None else self.service.served_name()

    @property
    def base(self) -> "ModelHandle":
        """The model whose engine runs this handle's requests (itself, unless an adapter)."""
        return self.parent if self.parent is not None else self

    @property
    def priced(self) -> ModelConfig:
        """The config with its price table and version (defaults for an unconfigured model);
        an adapter's is its base model's, under the adapter's name."""
        if self.lora is not None:
            return replace(self.base.priced, name=self.name, lora=None)
        return self.config if self.config is not None else ModelConfig(name=self.name)

    def adapter(self, lora: Any) -> "ModelHandle":
        """The handle of the LoRA adapter `lora` (a LoRARequest) served on this model."""
        return replace(self, lora=lora, parent=self.base, _tokenizer_fp=None)

    def state(self) -> str:
        """`ready`, `loading`, or `failed` (its engine thread died or was shut down)."""
        if self.engine.is_ready:
            return "ready"
        if self.engine.errored is None and self.engine.engine is None:
            return "loading"
        return "failed"

    def shares_tokenizer(self, other: "ModelHandle") -> bool:
        """True when both models turn every text into the same token ids (same tokenizer
        class, vocabulary, special tokens and chat template), so a prompt is tokenized once."""
        return self is other or self._fingerprint() == other._fingerprint()

    def _fingerprint(self) -> str:
        if self._tokenizer_fp is None:  # computed once per model, after its engine loaded
            tok = self.engine.tokenizer  # None for an engine started on token ids only
            described = None if tok is None else [
                type(tok).__name__, sorted(tok.get_vocab().items()), getattr(tok, "chat_template", None),
                str(getattr(tok, "special_tokens_map", {}))]
            self._tokenizer_fp = hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()
        return self._tokenizer_fp


@dataclass
class ModelSet:
    handles: list[ModelHandle]  # small to large; the first is the default
    unavailable: dict[str, str] = field(default_factory=dict)  # optional models that failed to load: why
    adapters: dict[str, ModelHandle] = field(default_factory=dict)  # LoRA adapter name -> its handle

    def __iter__(self):
        return iter(self.handles)

    def get(self, name: str) -> ModelHandle:
        """The model or adapter of that served name (404 if an adapter was unloaded since)."""
        m = self.adapters.get(name) or next((m for m in self.handles if m.name == name), None)
        if m is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return m

    def allowed(self, tenant: TenantConfig, adapters: bool = False) -> list[ModelHandle]:
        """The models the tenant may use, in order; with `adapters`, its adapters after them."""
        served = [*self.handles, *(self.adapters.values() if adapters else ())]
        return [m for m in served if tenant.models is None or m.name in tenant.models]

    def named(self, name: str) -> ModelHandle | None:
        """The model or adapter served under `name` (a served name or an engine's model name)."""
        if name in self.adapters:
            return self.adapters[name]
        return next((m for m in self.handles if name == m.name or (
            m.engine.engine is not None and name == m.engine.model_name)), None)

    def lookup(self, tenant: TenantConfig, name: str | None) -> ModelHandle:
        """The model a request names (None: the tenant's first allowed one); a name is a
        served name, an adapter's name or the engine's own model name. 404 / 403 otherwise."""
        if name is None:
            allowed = self.allowed(tenant)
            if not allowed:
                raise APIError(403, f"Tenant {tenant.name} may not use any model.", code="model_not_allowed")
            return allowed[0]
        m = self.named(name)
        if m is not None:
            if tenant.models is not None and m.name not in tenant.models:
                raise APIError(403, f"Tenant {tenant.name} may not use the model `{name}`.",
                               param="model", code="model_not_allowed")
            return m
        if name in self.unavailable:
            raise APIError(503, f"The model `{name}` is unavailable on this server.", param="model",
                           code="model_unavailable")
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
