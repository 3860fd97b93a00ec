"""Drives any OpenAI-compatible server over HTTP with SSE streaming and times every request.

`run_http(base_url, requests, offsets, max_concurrency)` sends each `HttpRequest` at its offset
(seconds after the start; all at once when offsets is None), at most `max_concurrency` in flight,
and returns one `RequestRecord` per request plus the wall time from the first send to the last
completion. Time to first token is the first streamed chunk that carries output text; the output
token count comes from the server's `usage` when it sends one, else the number of such chunks.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from benchmarks.stats import RequestRecord


@dataclass
class HttpRequest:
    """One request body (without the streaming fields) for `endpoint`."""

    endpoint: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict
    prompt_len: int = 0  # known in advance for token prompts; else taken from usage
    expected_tokens: int | None = None


def completion_request(model: str, prompt_ids: list[int], max_tokens: int) -> HttpRequest:
    """A /v1/completions request for exactly `max_tokens` tokens after a token-id prompt."""
    body = {"model": model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "min_tokens": max_tokens}
    return HttpRequest("/v1/completions", body, len(prompt_ids), max_tokens)


def chat_request(model: str, text: str, max_tokens: int, ignore_eos: bool = False) -> HttpRequest:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0.0}
    if ignore_eos:
        body["ignore_eos"] = True
    return HttpRequest("/v1/chat/completions", body, 0, max_tokens if ignore_eos else None)


def _chunk_text(chunk: dict) -> str | None:
    choices = chunk.get("choices") or []
    if not choices:
        return None
    c = choices[0]
    if "text" in c:
        return c["text"] or None
    return (c.get("delta") or {}).get("content") or None


async def _send(client: httpx.AsyncClient, base_url: str, req: HttpRequest) -> RequestRecord:
    body = {**req.body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    itls: list[float] = []
    chunks = 0
    usage: dict = {}
    try:
        async with client.stream("POST", base_url + req.endpoint, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:200]
                return RequestRecord(req.prompt_len, 0, None, time.perf_counter() - t0,
                                     error=f"HTTP {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if _chunk_text(chunk) is None:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itls.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestRecord(req.prompt_len, 0, None, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    n_out = usage.get("completion_tokens") or chunks
    n_in = req.prompt_len or usage.get("prompt_tokens") or 0
    err = None
    if req.expected_tokens is not None and n_out != req.expected_tokens:
        err = f"expected {req.expected_tokens} output tokens, got {n_out}"
    return RequestRecord(n_in, n_out, None if first is None else first - t0, end - t0, itls, err)


async def _run(base_url: str, reqs: list[HttpRequest], offsets: list[float] | None,
               max_concurrency: int | None, timeout: float) -> tuple[list[RequestRecord], float]:
    cap = max_concurrency or len(reqs)
    sem = asyncio.Semaphore(cap)
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            if offsets is not None:
                await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with sem:
                return await _send(client, base_url, reqs[i])

        records = await asyncio.gather(*(one(i) for i in range(len(reqs))))
        return list(records), time.perf_counter() - start


def run_http(base_url: str, reqs: list[HttpRequest], offsets: list[float] | None = None,
             max_concurrency: int | None = None, timeout: float = 1800.0) -> tuple[list[RequestRecord], float]:
    """Sends all requests (see module doc); returns (records in input order, wall seconds)."""
    if offsets is not None and len(offsets) != len(reqs):
        raise ValueError(f"offsets has {len(offsets)} entries for {len(reqs)} requests")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    return asyncio.run(_run(base_url.rstrip("/"), reqs, offsets, max_concurrency, timeout))
