"""The OpenAPI 3.1 description of every route, served at `/openapi.json` (and rendered by
`/docs` with locally served assets).

It describes what the server accepts, as tightly as a schema can: a request it marks valid
is accepted unless it breaks a rule that depends on the model or the server's settings (token
ids below the vocabulary size, prompt + max_tokens within the context, total size of stop
strings, configured caps), and those rules are stated in the field descriptions.
"""
from __future__ import annotations

from typing import Any

from server.openapi_schemas import ERRORS, INT, SCHEMAS, STR, TIME, USAGE_GROUPS, json_response, ref


# One server-sent event of a stream: `data` is a JSON chunk (Completion / ChatCompletion
# shaped, with deltas), an in-band error envelope, or the final `[DONE]`.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": STR, "data": STR, "id": STR, "retry": INT}}


def _generation(summary: str, request: str, response: str) -> dict:
    return {"post": {
        "summary": summary,
        "description": "An `Idempotency-Key` header (1 to 255 visible ASCII characters) makes "
                       "retries safe where the server's config enables idempotency.",
        "parameters": [{"name": "X-Request-Id", "in": "header", "required": False, "schema": STR}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
        "responses": {
            "200": {"description": "The completion; with stream=true, server-sent events of "
                                   "chunks ending with `data: [DONE]`",
                    "content": {"application/json": {"schema": ref(response)},
                                "text/event-stream": {"schema": _SSE_EVENT}}},
            **ERRORS}}}


def _responses_path() -> dict:
    op = _generation("Model response (OpenAI's Responses API, stateless)", "ResponsesRequest", "Response")
    op["post"]["responses"]["200"]["description"] = (
        "The response; with stream=true, typed server-sent events (`event: response.*`, each with a "
        "sequence_number) ending with response.completed, response.incomplete or response.failed")
    return op


def _simple(method: str, summary: str, response: dict, request: str | None = None,
            parameters: list[dict] | None = None) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": response, **ERRORS}}
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
    if parameters:
        op["parameters"] = parameters
    return {method: op}


def build_openapi(version: str) -> dict:
    """The whole document; it validates as OpenAPI 3.1."""
    text = {"description": "Plain text", "content": {"text/plain": {"schema": STR}}}
    html = {"description": "HTML page", "content": {"text/html": {"schema": STR}}}
    usage_params = [
        {"name": "group_by", "in": "query", "required": False,
         "schema": {"enum": USAGE_GROUPS, "default": "tenant"}},
        {"name": "start", "in": "query", "required": False, "schema": TIME,
         "description": "Only records at or after this time."},
        {"name": "end", "in": "query", "required": False, "schema": TIME,
         "description": "Only records before this time."},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": version,
                 "description": "OpenAI-compatible LLM inference server."},
        "paths": {
            "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest",
                                                "ChatCompletion"),
            "/v1/responses": _responses_path(),
            "/v1/embeddings": _simple("post", "Embeddings: the model's final hidden states, pooled and "
                                      "L2-normalized", json_response(ref("EmbeddingList"), "Embeddings"),
                                      "EmbeddingRequest"),
            "/v1/models": _simple("get", "Served models", json_response(ref("ModelList"), "Models")),
            "/v1/usage": _simple("get", "Token and cost totals per group (admin keys only)",
                                 json_response(ref("UsageReport"), "Usage report"), parameters=usage_params),
            "/tokenize": _simple("post", "Tokenize a prompt or chat messages",
                                 json_response(ref("TokenizeResponse"), "Token ids"), "TokenizeRequest"),
            "/detokenize": _simple("post", "Token ids to text",
                                   json_response(ref("DetokenizeResponse"), "Text"), "DetokenizeRequest"),
            "/v1/load_lora_adapter": _simple(
                "post", "Load a LoRA adapter, served by its name in `model` (admin keys only; 404 when "
                "LoRA is not enabled)", text, "LoadLoRAAdapterRequest"),
            "/v1/unload_lora_adapter": _simple(
                "post", "Unload a LoRA adapter (admin keys only; 404 for an unknown name or when LoRA "
                "is not enabled)", text, "UnloadLoRAAdapterRequest"),
            "/health": _simple("get", "Liveness: 503 when an engine stopped or stalled (restart the process)",
                               json_response({"type": "object"}, "Healthy")),
            "/ready": _simple("get", "Readiness: 200 when every model can serve, 503 otherwise",
                              json_response({"type": "object"}, "Ready")),
            "/version": _simple("get", "Server version",
                                json_response({"type": "object", "properties": {"version": STR}}, "Version")),
            "/metrics": _simple("get", "Prometheus metrics", text),
            "/admin/metrics": _simple("get", "Per-tenant Prometheus metrics (admin keys only)", text),
            "/openapi.json": _simple("get", "This document", json_response({"type": "object"}, "OpenAPI")),
            "/docs": _simple("get", "Interactive API console (Swagger UI)", html),
            "/": _simple("get", "Chat playground", html),
        },
        # Optional bearer auth (servers run open unless their config lists API keys); it gives
        # the /docs console its "Authorize" button.
        "security": [{}, {"apiKey": []}],
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }
