"""Overhead of the production API layer per request, at 50 concurrent clients.

    python -m benchmarks.api_overhead                 # off vs on (memory store), + Redis if found
    python -m benchmarks.api_overhead --requests 1000 --concurrency 50 --redis-url redis://...

The same workload runs against the same server code with the layer's features off (no config:
open, unlimited) and on (API keys, token + request + concurrency limits, an Idempotency-Key
per request, PII + blocklist guards on the output stream, usage records and cost, cache and
dedup lookups that miss), in one run, rounds alternating. The engine is the tests' echo engine
(no model compute), so the difference is the layer's own cost: added latency per request and
added server time per request (1/throughput on - 1/throughput off, the event loop being the
bottleneck). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import statistics
import time

import httpx

from server.auth import hash_key
from server.config_file import ProductionConfig, config_from_dict
from tests.test_prod_harness import ProdServer, echo_engine, redis_server

KEY = "sk-bench-0123456789"
PROMPT = "Write to jane.roe@example.org about the invoice 4111 1111 1111 1111 before Friday, thanks."


def layer_config(redis_url: str | None) -> ProductionConfig:
    return config_from_dict({
        "redis_url": redis_url,
        "cache": {"response_cache": True, "dedup": True},
        "guards": {"pii": {"type": "pii"}, "block": {"type": "blocklist", "terms": ["drop table"]}},
        "tenants": [{"name": "bench", "api_key_sha256": [hash_key(KEY)], "tokens_per_minute": 10**9,
                     "requests_per_minute": 10**7, "max_concurrent": 1000, "guards": ["pii", "block"]}],
    })


async def drive(base_url: str, requests: int, concurrency: int, with_layer: bool) -> dict:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": f"k-{time.time_ns()}-{i}",
                       "X-User-Id": f"user-{i % 7}"} if with_layer else {}
            start = time.perf_counter()
            r = await http.post("/v1/completions", headers=headers, json={
                "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "seed": time.time_ns() + i})
            latencies.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    latencies.sort()
    return {"req_s": requests / wall, "mean_ms": 1000 * statistics.fmean(latencies),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--redis-url", default=None, help="default: start redis-server if on PATH")
    args = p.parse_args()
    redis = None
    redis_url = args.redis_url
    if redis_url is None and shutil.which("redis-server"):
        redis = redis_server()
        redis_url = redis.url
    settings = [("off", None), ("on (memory store)", layer_config(None))]
    if redis_url:
        settings.append(("on (Redis store)", layer_config(redis_url)))
    results: dict[str, list[dict]] = {name: [] for name, _ in settings}
    try:
        for _ in range(args.rounds):
            for name, cfg in settings:
                srv = ProdServer(echo_engine(step_delay=0.0), cfg or ProductionConfig()).start()
                try:
                    asyncio.run(drive(srv.base_url, 50, args.concurrency, cfg is not None))  # warm-up
                    results[name].append(asyncio.run(drive(srv.base_url, args.requests, args.concurrency,
                                                           cfg is not None)))
                finally:
                    srv.stop()
    finally:
        if redis is not None:
            redis.stop()
    base = {k: statistics.fmean(r[k] for r in results["off"]) for k in results["off"][0]}
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}; "
          f"{args.requests} requests x {args.rounds} rounds, {args.concurrency} concurrent clients, "
          f"max_tokens 8, echo engine")
    print("| layer | req/s | mean ms | p50 ms | p99 ms | added latency ms/req | added server time ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        m = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        added_lat = m["mean_ms"] - base["mean_ms"]
        added_cpu = 1000 * (1 / m["req_s"] - 1 / base["req_s"])
        print(f"| {name} | {m['req_s']:.1f} | {m['mean_ms']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
              f"{added_lat:+.1f} | {added_cpu:+.2f} |")


if __name__ == "__main__":
    main()
