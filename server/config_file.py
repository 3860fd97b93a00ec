"""The production config file (`conveyor serve --config conveyor.toml`, or .yaml/.yml) loaded
into typed dataclasses.

Everything is off by default: with no file the server is open (no keys), unlimited, uncached,
unguarded and serves one model. Loading checks every field's type and rejects unknown
fields, raising `ValueError` that names the field (`tenants[1].tokens_per_minute: ...`), so a
typo never silently turns a limit off. See docs/conveyor.example.toml for a full example.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GUARD_TYPES = ("pii", "blocklist")
PII_KINDS = ("email", "phone", "credit_card", "ssn", "ip_address")


@dataclass
class PriceConfig:
    """US dollars per 1000 tokens. Cached prompt tokens default to the prompt price."""

    prompt_per_1k: float = 0.0
    cached_per_1k: float | None = None
    completion_per_1k: float = 0.0


@dataclass
class LoRAModuleConfig:
    """One LoRA adapter (PEFT format) served at start: requests name it in `model`.
    `base_model_name`: the served model it runs on (default: the model whose `lora` table lists it)."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass
class LoRAConfig:
    """Multi-LoRA serving for one model (docs/lora.md). `None` limits take the engine's
    defaults; listing `lora_modules` implies `enable_lora`."""

    enable_lora: bool = False
    max_loras: int | None = None  # adapters in one batch (GPU/CPU slots)
    max_lora_rank: int | None = None  # largest rank accepted
    max_cpu_loras: int | None = None  # adapters kept loaded in CPU memory
    lora_modules: list[LoRAModuleConfig] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)


@dataclass
class ModelConfig:
    """One served model, each run by its own engine. `path` None means the default model;
    `engine` holds further `EngineConfig` fields (max_model_len, num_blocks, device, ...).
    `conveyor serve` exits when a model fails to load, unless it is `optional`: then the
    others are served and this one is reported unavailable."""

    name: str
    path: str | None = None
    optional: bool = False
    version: str = "1"
    dtype: str = "auto"
    price: PriceConfig = field(default_factory=PriceConfig)
    engine: dict[str, Any] = field(default_factory=dict)
    lora: LoRAConfig | None = None  # LoRA adapters served on this model (their price: the model's)


@dataclass
class TenantConfig:
    """A customer of the API. Keys are stored as SHA-256 hex digests (`conveyor hash-key KEY`
    prints one). `None` limits mean unlimited; `models` None means every model."""

    name: str
    api_key_sha256: list[str] = field(default_factory=list)
    admin: bool = False  # may read /v1/usage
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    models: list[str] | None = None
    priority: int = 0  # used when a request does not set one
    max_cost_per_request: float | None = None  # routing never picks a model estimated above it
    guards: list[str] = field(default_factory=list)  # names of [guards.NAME] sections


@dataclass
class GuardConfig:
    type: str  # pii | blocklist
    kinds: list[str] = field(default_factory=lambda: list(PII_KINDS))  # pii: what to redact
    redact_input: bool = False  # pii: also redact the prompt before the model sees it
    terms: list[str] = field(default_factory=list)  # blocklist: case-insensitive phrases
    check_input: bool = True  # blocklist: also refuse requests whose input has a phrase


@dataclass
class RoutingRule:
    """`model: "auto"` takes the first rule whose every set bound holds."""

    model: str
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_complexity: float | None = None  # 0..1, see server/routing.py


@dataclass
class RoutingConfig:
    rules: list[RoutingRule] = field(default_factory=list)
    default: str | None = None  # when no rule matches; None: the last model (the largest)


@dataclass
class IdempotencyConfig:
    ttl_seconds: float = 24 * 3600.0  # how long a key is remembered
    join_in_flight: bool = False  # a retry while the first runs waits for it instead of a 409


@dataclass
class CacheConfig:
    response_cache: bool = False  # answer repeated deterministic requests from a cache
    ttl_seconds: float = 300.0
    dedup: bool = False  # identical concurrent deterministic requests share one generation


@dataclass
class StoreConfig:
    fail_open: bool = False  # store unreachable: admit limited tenants without limits, not 503


@dataclass
class ProductionConfig:
    tenants: list[TenantConfig] = field(default_factory=list)
    models: list[ModelConfig] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    guards: dict[str, GuardConfig] = field(default_factory=dict)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    redis_url: str | None = None
    rate_limit_window_seconds: float = 60.0
    lora: LoRAConfig | None = None  # the single model's adapters (no [[models]]; else models[i].lora)
    health_stall_seconds: float | None = None  # None: --health-stall-seconds or its default (120)

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        for i, t in enumerate(self.tenants):
            for g in t.guards:
                if g not in self.guards:
                    raise ValueError(f"tenants[{i}].guards: no [guards.{g}] section")
            for name in ("tokens_per_minute", "requests_per_minute", "max_concurrent"):
                if getattr(t, name) is not None and getattr(t, name) < 1:
                    raise ValueError(f"tenants[{i}].{name} must be >= 1, got {getattr(t, name)}")
        tenant_names = [t.name for t in self.tenants]
        if len(set(tenant_names)) != len(tenant_names):
            raise ValueError(f"tenants: names must be unique, got {tenant_names}")
        for name, g in self.guards.items():
            if g.type not in GUARD_TYPES:
                raise ValueError(f"guards.{name}.type must be one of {GUARD_TYPES}, got {g.type!r}")
            bad = [k for k in g.kinds if k not in PII_KINDS]
            if bad:
                raise ValueError(f"guards.{name}.kinds: unknown {bad}; known: {PII_KINDS}")
        if self.lora is not None and self.models:
            raise ValueError("lora: with [[models]], set LoRA per model (models[i].lora)")
        for i, m in enumerate(self.models):
            if m.lora is not None and not m.lora.enabled and (m.lora.max_loras or m.lora.max_lora_rank
                                                              or m.lora.max_cpu_loras):
                raise ValueError(f"models[{i}].lora: limits need enable_lora = true or lora_modules")
        adapters = [a.name for lora in [self.lora, *(m.lora for m in self.models)] if lora is not None
                    for a in lora.lora_modules]
        if len(set(adapters)) != len(adapters) or set(adapters) & set(names):
            raise ValueError(f"lora_modules: adapter names must be unique and differ from model names, got {adapters}")
        for i, r in enumerate(self.routing.rules):
            if names and r.model not in names + adapters:
                raise ValueError(f"routing.rules[{i}].model: no model named {r.model!r}")
        if self.idempotency.ttl_seconds <= 0 or self.cache.ttl_seconds <= 0:
            raise ValueError("idempotency.ttl_seconds and cache.ttl_seconds must be > 0")
        if self.rate_limit_window_seconds <= 0:
            raise ValueError("rate_limit_window_seconds must be > 0")
        if self.health_stall_seconds is not None and not self.health_stall_seconds >= 0:
            raise ValueError(f"health_stall_seconds must be >= 0 (0 disables the check), "
                             f"got {self.health_stall_seconds}")


def load_config(path: str | Path) -> ProductionConfig:
    """Reads a .toml, .yaml or .yml file into a ProductionConfig (ValueError naming the field)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the config file {path}: {exc.strerror}") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    else:
        raise ValueError(f"{path}: the config file must end in .toml, .yaml or .yml")
    return config_from_dict(data)


def config_from_dict(data: Any) -> ProductionConfig:
    return _convert(ProductionConfig, data, "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against type `tp` (dataclass, list, dict, optional, scalar)."""
    label = where or "config"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{label} must be a table/mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        unknown = set(value) - set(hints)
        if unknown:
            raise ValueError(f"{label}: unknown field(s) {sorted(unknown)}; known: {sorted(hints)}")
        kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"{label}: {exc}") from None
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{label} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{label} must be a table/mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{label}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ValueError(f"{label} must be of type {tp.__name__}, got {value!r}")
    return value
