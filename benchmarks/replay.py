"""Replays a request trace against a running Conveyor server at the trace's arrival times.

    python -m benchmarks.replay TRACE.jsonl --url http://127.0.0.1:8000 [--speed 2] \
        [--max-requests 500] [--max-seconds 120] [--api-key heavy=sk-... ] [--out replay.jsonl]

TRACE is any trace `engine.scheduler.traces.load_trace` reads: one written by ``conveyor serve
--trace-file``, by ``benchmarks/simulate.py --save-trace``, or by hand. Each request is sent as
``POST /v1/completions`` with a prompt of ``prompt_len`` token ids (drawn below
``--vocab-size``; no text is ever replayed), ``max_tokens = output_len``, ``ignore_eos`` (so it
generates exactly that many tokens, as in the simulator), its ``priority``, and the API key
mapped to its ``tenant``. Requests go out at ``arrival_time / speed``; streaming gives the
client-side TTFT. Prints throughput, TTFT / TPOT / end-to-end percentiles and goodput under
``--ttft-slo`` / ``--tpot-slo``, and writes one JSON line per request to ``--out``.

Bounded: at most ``--max-requests`` requests, none sent after ``--max-seconds``, and anything
still running ``--grace-seconds`` later is cancelled. Loopback only: the URL's host must
resolve to a loopback address (a replay is a load test; it is not for other people's servers).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from engine.scheduler.simulator import jain_index, percentiles
from engine.scheduler.traces import TraceRequest, load_trace


@dataclass
class ReplayRecord:
    request_id: str
    tenant: str | None
    priority: int
    prompt_len: int
    output_len: int  # tokens received
    sent_at: float  # seconds from the replay's start
    ttft_s: float | None = None
    e2e_s: float | None = None
    status: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_len < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)


def check_loopback(url: str) -> None:
    """Raises ValueError unless every address ``url``'s host resolves to is a loopback one."""
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"--url must point at this machine (loopback), {host!r} resolves to {sorted(addrs)}")


async def send(client, url: str, model: str, req: TraceRequest, prompt: list[int], key: str | None,
               start: float, record: ReplayRecord) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, "priority": req.priority}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sent = time.perf_counter()
    record.sent_at = sent - start
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                record.error = (await resp.aread()).decode(errors="replace")[:200]
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - sent
                    tokens += 1  # one streamed chunk per token (no stop strings: nothing is held back)
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
        record.e2e_s = time.perf_counter() - sent
    except Exception as exc:  # noqa: BLE001 - a replay records every failure and carries on
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        record.output_len = tokens


async def replay(trace: list[TraceRequest], args: argparse.Namespace) -> list[ReplayRecord]:
    import httpx

    keys = dict(part.split("=", 1) for part in args.api_key)
    rng = np.random.default_rng(args.seed)
    trace = trace[: args.max_requests]
    prompts = [rng.integers(10, args.vocab_size, size=r.prompt_len).tolist() for r in trace]
    records = [ReplayRecord(r.request_id, r.tenant, r.priority, r.prompt_len, 0, 0.0) for r in trace]
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        model = args.model or (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        tasks = []
        for req, prompt, record in zip(trace, prompts, records):
            due = req.arrival_time / args.speed
            if due > args.max_seconds:
                break
            await asyncio.sleep(max(0.0, due - (time.perf_counter() - start)))
            key = keys.get(req.tenant or "", args.default_api_key)
            tasks.append(asyncio.create_task(send(client, args.url, model, req, prompt, key, start, record)))
        remaining = args.max_seconds + args.grace_seconds - (time.perf_counter() - start)
        done, pending = await asyncio.wait(tasks, timeout=max(remaining, 0.1)) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        return records[: len(tasks)]


def summarize(records: list[ReplayRecord], ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in records if r.status == 200 and r.e2e_s is not None]
    span = max((r.sent_at + r.e2e_s for r in ok), default=0.0) - min((r.sent_at for r in ok), default=0.0)
    tenants = sorted({r.tenant for r in ok if r.tenant is not None})
    meets = [r.ttft_s <= ttft_slo and (r.tpot_s is None or r.tpot_s <= tpot_slo) for r in ok]
    return {
        "num_sent": len(records), "num_ok": len(ok), "num_failed": len(records) - len(ok),
        "throughput_out_tok_s": sum(r.output_len for r in ok) / span if span > 0 else float("nan"),
        "goodput": float(np.mean(meets)) if meets else float("nan"),
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "jain_fairness": jain_index([sum(r.prompt_len + r.output_len for r in ok if r.tenant == t) for t in tenants]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="JSON-lines trace (conveyor serve --trace-file, or simulate --save-trace)")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model name to send (default: the server's first)")
    parser.add_argument("--speed", type=float, default=1.0, help="2 replays twice as fast (arrivals / 2)")
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="send nothing after this")
    parser.add_argument("--grace-seconds", type=float, default=60.0, help="then wait this long for the rest")
    parser.add_argument("--max-concurrency", type=int, default=256, help="open connections at most")
    parser.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids are drawn below this")
    parser.add_argument("--api-key", action="append", default=[], metavar="TENANT=KEY",
                        help="the key to send for a tenant's requests (repeatable)")
    parser.add_argument("--default-api-key", help="key for requests whose tenant has no --api-key")
    parser.add_argument("--ttft-slo", type=float, default=2.0)
    parser.add_argument("--tpot-slo", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write one JSON line per request here")
    args = parser.parse_args(argv)
    if not args.speed > 0:
        parser.error("--speed must be > 0")
    if any("=" not in k for k in args.api_key):
        parser.error("--api-key must look like TENANT=KEY")
    try:
        check_loopback(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    args.url = args.url.rstrip("/")
    records = asyncio.run(replay(load_trace(args.trace), args))
    summary = summarize(records, args.ttft_slo, args.tpot_slo)
    if args.out:
        Path(args.out).write_text("".join(json.dumps({**asdict(r), "tpot_s": r.tpot_s}) + "\n" for r in records))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
