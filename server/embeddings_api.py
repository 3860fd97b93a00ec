"""`POST /v1/embeddings`: OpenAI's embeddings endpoint, computed by the served model's engine.

Each input becomes one pooling request (engine/pooling.py: the final hidden states, mean-pooled
by default, L2-normalized), all submitted at once so the scheduler batches them with whatever
else runs. The request takes the production path of the generation endpoints, in the same
order: drain check, auth (401), input guards (400), the tenant's model allow-list (403 / 404),
rate limits on the prompt tokens (429), the waiting budget (503), the engine, then one settle
that replaces the reservation by the real token count and writes the usage record (cost at the
model's prompt price), however the request ends. Idempotency keys and the response cache are
not applied: embeddings are deterministic and side-effect free, so a retry is already safe.

Refused with 400 naming the field: an empty or malformed `input`, an input longer than the
model's context (`input[i]`), token ids past the vocabulary, an unknown `encoding_format`, and
`dimensions` other than the model's hidden size (no truncation: the model was not trained for
it).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.async_engine import EngineDeadError
from engine.errors import show
from engine.outputs import RequestOutput
from engine.pooling import POOLING_METHODS, PoolingParams
from server.errors import APIError, bad_request
from server.guardrails import GuardChain
from server.metrics import ABORT
from server.rate_limit import Reservation
from server.serving import ClientGone, read_json, request_logger, until_disconnect
from server.usage import UsageRecord, cost

MAX_INPUTS = 2048  # OpenAI's bound on inputs per request
ENCODINGS = ("float", "base64")


@dataclass
class EmbeddingRequest:
    """A parsed request. `inputs` are strings or token-id lists, one embedding each."""

    inputs: list[str | list[int]]
    model: str | None
    encoding_format: str
    dimensions: int | None
    user: str | None
    pooling: str

    @classmethod
    def from_json(cls, body: Any) -> "EmbeddingRequest":
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        fmt = _optional(body, "encoding_format", str) or "float"
        if fmt not in ENCODINGS:
            raise bad_request(f"encoding_format must be float or base64, got {show(fmt)}", "encoding_format")
        dimensions = _optional(body, "dimensions", int)
        if dimensions is not None and dimensions < 1:
            raise bad_request(f"dimensions must be >= 1, got {dimensions}", "dimensions")
        pooling = _optional(body, "pooling", str) or "mean"
        if pooling not in POOLING_METHODS:
            raise bad_request(f"pooling must be one of {', '.join(POOLING_METHODS)}, got {show(pooling)}", "pooling")
        return cls(_inputs(body.get("input")), _optional(body, "model", str), fmt, dimensions,
                   _optional(body, "user", str), pooling)


def _optional(body: dict, name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise bad_request(f"{name} must be {'an integer' if kind is int else 'a string'}, got {show(value)}", name)
    return value


def _ids(value: Any) -> list[int] | None:
    """`value` as a non-empty list of non-negative integers, else None."""
    if not isinstance(value, list) or not value:
        return None
    ids = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    return ids if ok else None


def _inputs(value: Any) -> list[str | list[int]]:
    what = "input must be a non-empty string, a list of them, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        if not value:
            raise bad_request("input must not be an empty string", "input")
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request(what, "input")
    ids = _ids(value)
    if ids is not None:
        return [ids]
    if len(value) > MAX_INPUTS:
        raise bad_request(f"input may hold at most {MAX_INPUTS} items, got {len(value)}", "input")
    out: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            out.append(item)
        elif (ids := _ids(item)) is not None:
            out.append(ids)
        else:
            raise bad_request(f"input[{i}] must be a non-empty string or a non-empty list of token ids, "
                              f"got {show(item)}", f"input[{i}]")
    return out


def encode(vector: list[float], fmt: str) -> list[float] | str:
    """The embedding as JSON floats, or (base64) its little-endian float32 bytes, as OpenAI."""
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@dataclass
class EmbeddingsAPI:
    """The endpoint, over the server's `Gateway` (its auth, models, limiter, usage, guards)."""

    gateway: Any  # server.gateway.Gateway (typed loosely: the gateway imports nothing from here)

    async def handle(self, request: Request) -> Response:
        g = self.gateway
        g.drain.check_admitting()
        log = request_logger(request)
        tenant = g.tenant(request)
        log.extra["tenant"] = tenant.name
        req = EmbeddingRequest.from_json(await read_json(request, g.settings.max_body_bytes))
        if tenant.guards:
            chain = GuardChain([g.guards[name] for name in tenant.guards], g.metrics.guard_action)
            texts = chain.check_input([x for x in req.inputs if isinstance(x, str)])
            it = iter(texts)
            req.inputs = [next(it) if isinstance(x, str) else x for x in req.inputs]
        model = g.models.lookup(tenant, req.model)
        model.service.require_ready()
        log.extra["model"] = model.name
        engine = model.engine.engine
        if getattr(engine, "hf_config", None) is None:  # an engine without a model (a stand-in) cannot pool
            raise bad_request(f"The model `{model.name}` does not serve embeddings.", "model", code="unsupported")
        if req.dimensions is not None and req.dimensions != engine.hf_config.hidden_size:
            raise bad_request(f"dimensions must be {engine.hf_config.hidden_size} for this model (it cannot "
                              f"shorten its embeddings), got {req.dimensions}", "dimensions", code="unsupported")
        prompts = [self._tokenize(model, x, i, len(req.inputs) > 1) for i, x in enumerate(req.inputs)]
        total = sum(len(p) for p in prompts)
        reservation = await g.limiter.reserve(tenant, total)
        headers = {**reservation.headers, "X-Conveyor-Model": model.name}
        rid = request.scope["state"]["request_id"]
        log.info("embeddings: %d inputs, %d tokens, pooling=%s", len(prompts), total, req.pooling)
        outs: list[RequestOutput | None] = [None] * len(prompts)
        try:
            ticket = model.service.admission.admit(total)
        except APIError:
            model.metrics.rejected("queue_full")
            await reservation.settle(0)
            raise
        try:
            params = PoolingParams(pooling=req.pooling)
            await until_disconnect(request, self._run(model, prompts, params, f"embd-{rid}-{uuid.uuid4().hex[:8]}",
                                                      tenant, outs))
        except ClientGone:
            request.scope["state"]["client_gone"] = True
            log.info("client disconnected, aborted")
            return Response(status_code=499)
        finally:
            ticket.release()
            for out in outs:
                model.metrics.observe_finished(out, "stop" if out is not None else ABORT)
            await _shielded(self._settle(request, reservation, tenant, model, req, outs))
        usage = {"prompt_tokens": total, "total_tokens": total}
        headers.update({"X-Conveyor-Prompt-Tokens": str(total),
                        "X-Conveyor-Cost": f"{cost(model.priced.price, total, 0, 0):.8f}"})
        data = [{"object": "embedding", "index": i, "embedding": encode(out.embedding, req.encoding_format)}
                for i, out in enumerate(outs)]
        log.info("embeddings finished: %d vectors of %d", len(data), len(outs[0].embedding))
        return JSONResponse({"object": "list", "data": data, "model": model.name, "usage": usage}, headers=headers)

    @staticmethod
    def _tokenize(model: Any, item: str | list[int], i: int, many: bool) -> list[int]:
        """Token ids of one input; 400 naming it when it cannot fit the model."""
        param = f"input[{i}]" if many else "input"
        engine = model.engine.engine
        if isinstance(item, str):
            ids = model.engine.tokenizer.encode(item)
        else:
            vocab = engine.hf_config.vocab_size
            bad = next((t for t in item if t >= vocab), None)
            if bad is not None:
                raise bad_request(f"{param} must hold token ids below the vocabulary size {vocab}, got {bad}", param)
            ids = item
        limit = engine.max_model_len
        cap = model.service.settings.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise bad_request(f"{param} has {len(ids)} tokens, more than this server's limit of {cap} prompt "
                              "tokens.", param, code="prompt_too_long")
        if len(ids) > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, {param} has "
                              f"{len(ids)} tokens. Please reduce its length.", param, code="context_length_exceeded")
        return ids

    @staticmethod
    async def _run(model: Any, prompts: list[list[int]], params: PoolingParams, prefix: str, tenant: Any,
                   outs: list[RequestOutput | None]) -> None:
        """Runs every input on the engine at once; the first failure cancels (aborts) the rest."""
        async def one(i: int) -> None:
            lora = {"lora_request": model.lora} if model.lora is not None else {}  # a LoRA adapter's hidden states
            stream = model.engine.generate(prompts[i], params, f"{prefix}-{i}", cache_salt=f"tenant:{tenant.name}",
                                           tenant=tenant.name, priority=tenant.priority, **lora)
            try:
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        if out.finished:
                            outs[i] = out
            except ValueError as exc:
                raise bad_request(str(exc), f"input[{i}]" if len(prompts) > 1 else "input") from None
            except EngineDeadError:
                raise APIError(503, "The engine is unavailable.", code="engine_unavailable") from None
            if outs[i] is None or outs[i].embedding is None:
                raise APIError(503, "The engine ended the request before it finished.", code="engine_unavailable")

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _settle(self, request: Request, reservation: Reservation, tenant: Any, model: Any,
                      req: EmbeddingRequest, outs: list[RequestOutput | None]) -> None:
        """Replaces the reservation by the tokens computed and records the usage; never raises."""
        g, log = self.gateway, request_logger(request)
        done = [o for o in outs if o is not None]
        tokens = sum(len(o.prompt_token_ids) for o in done)
        cached = sum(o.num_cached_tokens for o in done)
        try:
            await reservation.settle(tokens)
            if done:
                rec = UsageRecord(time.time(), request.scope["state"]["request_id"], tenant.name,
                                  req.user or request.headers.get("x-user-id"), request.headers.get("x-feature-id"),
                                  model.name, model.priced.version, tokens, cached, 0,
                                  cost(model.priced.price, tokens, cached, 0), base_model=model.base.name)
                await g.settle.account(rec)  # the gateway's own accounting (metrics + usage log)
        except Exception:  # noqa: BLE001 - settling must never break the response
            log.exception("settling embeddings usage failed")


async def _shielded(work: Any) -> None:
    """Runs `work` to the end even if the request's task is cancelled meanwhile."""
    await asyncio.shield(asyncio.ensure_future(work))
