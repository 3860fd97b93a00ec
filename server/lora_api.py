"""Loading and unloading LoRA adapters while the server runs: vLLM's
`POST /v1/load_lora_adapter {"lora_name", "lora_path"[, "base_model_name"]}` and
`POST /v1/unload_lora_adapter {"lora_name"}`, and the start-up adapters of `--lora-modules`
(loaded through the same `LoRAAdmin.load`, before the port opens).

Guarantees: with tenants configured only admin keys may call either route (403); a server
with LoRA enabled on no model answers 404 `lora_not_enabled`: it has no adapters to load into
or unload from (vLLM, likewise, exposes no such routes unless runtime LoRA updating is on); the
routes themselves exist on every server, so /openapi.json is the same everywhere. A
load is refused with 400 naming the field for a missing or malformed field, a name already
served (an adapter's or a model's), a base model that is not served with LoRA, and whatever
the engine refuses (bad path, rank above `--max-lora-rank`, a target module the model lacks,
a base-model mismatch: `param` is `lora_path`, the adapter at that path being what is wrong,
and the message says what). An unknown name on unload is a 404 `lora_not_found` (as vLLM).
An adapter becomes requestable by `model` only once its engine accepted it, and stops being
requestable before its engine unloads it. Success answers 200 with a plain-text message.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from engine.async_engine import EngineDeadError
from server.errors import APIError, bad_request
from server.routing import AUTO
from server.served_models import ModelHandle, ModelSet
from server.serving import read_json, request_logger

logger = logging.getLogger("conveyor.server")
# Names go into `vllm:lora_requests_info` as comma-separated lists and into URLs and logs:
# no commas, no whitespace, no control characters.
_NAME = re.compile(r"^[A-Za-z0-9._:/@+\-]{1,256}$")
_ENGINE_PARAMS = ("lora_name", "lora_path")  # engine params that are also request fields


def lora_enabled(model: ModelHandle) -> bool:
    return bool(getattr(model.engine.config, "enable_lora", False))


@dataclass
class LoRAAdmin:
    """Keeps `models.adapters` in step with the engines' loaded adapters. Adapter ids
    (`LoRARequest.lora_int_id`) are unique for the server's life, never reused."""

    models: ModelSet
    _next_id: int = 1
    _pending: set[str] = field(default_factory=set)  # names being loaded or unloaded right now

    @property
    def enabled(self) -> list[ModelHandle]:
        """The served models with LoRA enabled, in order."""
        return [m for m in self.models if lora_enabled(m)]

    def _require_enabled(self) -> list[ModelHandle]:
        enabled = self.enabled
        if not enabled:
            raise APIError(404, "LoRA is not enabled on this server: start it with --enable-lora or "
                           "--lora-modules (or a `lora` table in its config file).", code="lora_not_enabled")
        return enabled

    async def load(self, name: Any, path: Any, base_model_name: Any = None) -> ModelHandle:
        """Loads the adapter at `path` as `name` on `base_model_name` (default: the first model
        with LoRA enabled); APIError as the module docstring says."""
        enabled = self._require_enabled()
        name, path = _field(name, "lora_name"), _field(path, "lora_path")
        if not _NAME.match(name):
            raise bad_request("lora_name must be 1 to 256 letters, digits or ._:/@+- (no commas or spaces), "
                              f"got {name!r}", "lora_name")
        if name == AUTO or name in self._pending or self.models.named(name) is not None:
            raise bad_request(f"The model name `{name}` is already served (an adapter or a model); unload "
                              "it first or choose another lora_name.", "lora_name", code="lora_name_in_use")
        base = enabled[0]
        if base_model_name is not None:
            base = self.models.named(_field(base_model_name, "base_model_name"))
            if base is None or base.lora is not None or not lora_enabled(base):
                raise bad_request(f"base_model_name must name a served model with LoRA enabled "
                                  f"({', '.join(m.name for m in enabled)}), got {base_model_name!r}",
                                  "base_model_name")
        from engine.lora.request import LoRARequest  # the engine's LoRA package loads only when used

        request = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        self._pending.add(name)
        try:
            await base.engine.add_lora(request)
        except ValueError as exc:  # LoRAError (an InvalidParameterError) names what is wrong
            param = getattr(exc, "param", None)
            raise bad_request(str(exc), param if param in _ENGINE_PARAMS else "lora_path",
                              code="invalid_lora_adapter") from None
        except OSError as exc:
            raise bad_request(f"lora_path: cannot read the adapter at {path!r}: {exc.strerror or exc}",
                              "lora_path", code="invalid_lora_adapter") from None
        except EngineDeadError:
            raise APIError(503, "The engine is unavailable.", code="engine_unavailable") from None
        finally:
            self._pending.discard(name)
        handle = self.models.adapters[name] = base.adapter(request)
        logger.info("LoRA adapter %s (id %d) loaded from %s on model %s", name, request.lora_int_id, path, base.name)
        return handle

    async def unload(self, name: Any) -> None:
        """Stops serving the adapter, then unloads it from its engine (requests already
        running on it are the engine's to finish or refuse)."""
        self._require_enabled()
        name = _field(name, "lora_name")
        handle = self.models.adapters.get(name)
        if handle is None or name in self._pending:
            raise APIError(404, f"The LoRA adapter `{name}` cannot be found.", param="lora_name",
                           code="lora_not_found")
        del self.models.adapters[name]  # no new request reaches it from now on
        self._pending.add(name)
        try:
            removed = await handle.engine.remove_lora(name)
        except ValueError as exc:  # the engine refused (e.g. still in use): it keeps serving
            self.models.adapters[name] = handle
            raise bad_request(str(exc), "lora_name", code="lora_in_use") from None
        except EngineDeadError:
            raise APIError(503, "The engine is unavailable.", code="engine_unavailable") from None
        finally:
            self._pending.discard(name)
        if removed is False:
            logger.warning("LoRA adapter %s was not loaded on its engine any more", name)
        logger.info("LoRA adapter %s unloaded from model %s", name, handle.base.name)


def _field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{name} must be a non-empty string, got {value!r}", name)
    return value.strip()


@dataclass
class LoRARoutes:
    """The two HTTP routes over a `LoRAAdmin`; `gateway` authenticates (admin keys only)."""

    admin: LoRAAdmin
    gateway: Any  # server.gateway.Gateway

    async def _body(self, request: Request) -> dict:
        self.gateway.auth.require_admin(self.gateway.tenant(request))
        body = await read_json(request, self.gateway.settings.max_body_bytes)
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        return body

    async def load(self, request: Request) -> Response:
        body = await self._body(request)
        handle = await self.admin.load(body.get("lora_name"), body.get("lora_path"), body.get("base_model_name"))
        request_logger(request).info("loaded LoRA adapter %s", handle.name)
        return PlainTextResponse(f"Success: LoRA adapter '{handle.name}' added successfully.")

    async def unload(self, request: Request) -> Response:
        body = await self._body(request)
        await self.admin.unload(body.get("lora_name"))
        request_logger(request).info("unloaded LoRA adapter %s", body["lora_name"])
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name'].strip()}' removed successfully.")
