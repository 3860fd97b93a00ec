"""Reliability soak: the long versions of tests/test_store_outage.py and the disconnect tests,
against a real `conveyor serve` process on a real `redis-server` (AOF on).

    python -m benchmarks.soak                          # 300 streams, 20% disconnects, tiny model
    python -m benchmarks.soak --model default --requests 2000   # the default SmolLM2 (slow on CPU)
    python -m benchmarks.soak --model path/to/checkpoint

`--model tiny` (the default) serves a tiny random Llama (2 layers, hidden 64, SmolLM2's
tokenizer; tests/checkpoints.py; 1 thread, 4096 KV blocks) so that the run measures the
server, not the model.

Three phases, each reported:
1. **Streams with disconnects**: N streamed requests (C at a time), a fraction of which drop
   the connection after a few events. Afterwards the server must return to idle: running and
   waiting requests 0, KV cache usage 0 (blocks leaked = usage x blocks), concurrency leases 0,
   and its RSS roughly where it was after warm-up.
2. **Redis killed (-9) and restarted with its AOF under load**: streams in flight must end with
   `[DONE]`, new requests of the (limited) tenant get 503 + Retry-After, `/ready` is 503 while
   the store is down; measured: how long until 200s and readiness return, usage lost, and how
   long the tenant's leases take to return to 0 after the load stops (at most one lease ttl).
3. **SIGTERM with streams in flight** (`--shutdown-timeout`): how each stream ends, how long
   the process takes to exit, its exit code.
Writes <out-dir>/soak.json and prints a Markdown section for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import psutil

from benchmarks.peers.server_proc import ServerProcess, free_port
from benchmarks.throughput import machine_info
from server.auth import hash_key

KEY = "sk-soak-tenant-key-0001"
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Count from one to ten.",
           "Explain what a KV cache is in one sentence.", "Name three colours.", "Say hello politely."]


@dataclass
class Outcome:
    start: float
    end: float = 0.0
    status: int = 0
    done: bool = False  # saw data: [DONE]
    error_event: bool = False  # an in-band error event
    disconnected: bool = False  # we dropped it on purpose
    retry_after: bool = False


class Redis:
    """redis-server with AOF (fsync always) on a fixed port, killable with -9 and restartable."""

    def __init__(self, workdir: str) -> None:
        self.port, self.dir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                                      "--appendfsync", "always", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(400):
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def leases(self, tenant: str) -> int:
        import redis

        r = redis.Redis.from_url(self.url)
        now_ms = int(r.time()[0]) * 1000
        return int(r.zcount(f"rl:{tenant}:conc", now_ms, "+inf"))


async def stream(client: httpx.AsyncClient, max_tokens: int, drop_after: int | None) -> Outcome:
    """One streamed chat request; `drop_after` events then close the connection (a client
    that goes away), or None to read it to the end."""
    out = Outcome(time.monotonic())
    body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            out.status, out.retry_after = r.status_code, "retry-after" in r.headers
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                out.done |= line == "data: [DONE]"
                out.error_event |= line.startswith('data: {"error"')
                if drop_after is not None and events >= drop_after:
                    out.disconnected = True
                    break
    except httpx.HTTPError:
        out.status = out.status or -1
    out.end = time.monotonic()
    return out


def metrics(base_url: str) -> dict[str, float]:
    """Sums of each metric's samples by name (+ num_gpu_blocks from cache_config_info)."""
    sums: dict[str, float] = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        sums[name] = sums.get(name, 0.0) + float(value)
        if name == "vllm:request_success_total" and 'finished_reason="abort"' in key:
            sums["aborts"] = sums.get("aborts", 0.0) + float(value)
        if name == "vllm:cache_config_info":
            blocks = key.split('num_gpu_blocks="', 1)[1].split('"', 1)[0]
            sums["num_blocks"] = sums.get("num_blocks", 0) + int(blocks)
    return sums


async def until_idle(base_url: str, timeout: float = 60.0) -> tuple[dict[str, float], float]:
    t0 = time.monotonic()
    while True:
        m = metrics(base_url)
        idle = m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0 \
            and m.get("vllm:kv_cache_usage_perc", 0) == 0
        if idle or time.monotonic() - t0 > timeout:
            return m, time.monotonic() - t0
        await asyncio.sleep(0.2)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def phase_streams(base_url: str, pid: int, args) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300,
                                 limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        await asyncio.gather(*[stream(client, args.max_tokens, None) for _ in range(args.concurrency)])  # warm-up
        await until_idle(base_url)
        rss_before = rss_mib(pid)
        rng = random.Random(0)
        sem = asyncio.Semaphore(args.concurrency)

        async def one(i: int) -> Outcome:
            drop = rng.randint(1, max(1, args.max_tokens // 2)) if rng.random() < args.disconnect else None
            async with sem:
                return await stream(client, args.max_tokens, drop)
        t0 = time.monotonic()
        outs = await asyncio.gather(*[one(i) for i in range(args.requests)])
        wall = time.monotonic() - t0
    m, settle_s = await until_idle(base_url)
    return {"requests": len(outs), "disconnects": sum(o.disconnected for o in outs),
            "completed_with_done": sum(o.done for o in outs),
            "5xx": sum(o.status >= 500 for o in outs), "other_errors": sum(o.status < 0 or o.error_event for o in outs),
            "statuses": _count(o.status for o in outs), "wall_s": round(wall, 1),
            "running_after": m.get("vllm:num_requests_running"), "waiting_after": m.get("vllm:num_requests_waiting"),
            "kv_usage_after": m.get("vllm:kv_cache_usage_perc"),
            "blocks_leaked": round(m.get("vllm:kv_cache_usage_perc", 0) * m.get("num_blocks", 0)),
            "seconds_to_idle": round(settle_s, 1), "aborts_counted": m.get("aborts", 0),
            "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_mib(pid), 1)}


async def phase_redis(base_url: str, redis: Redis, args) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    outs: list[Outcome] = []
    ready: list[tuple[float, int]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300) as client:
        async def worker() -> None:
            while not stop.is_set():
                o = await stream(client, args.max_tokens, None)
                outs.append(o)
                if o.status != 200:
                    await asyncio.sleep(0.05)

        async def probe() -> None:
            while not stop.is_set():
                r = await client.get("/ready")
                ready.append((time.monotonic(), r.status_code))
                await asyncio.sleep(0.1)
        tasks = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)] + [asyncio.ensure_future(probe())]
        await asyncio.sleep(args.outage_after)
        killed = time.monotonic()
        redis.kill()
        await asyncio.sleep(args.outage_s)
        restarted = time.monotonic()
        await asyncio.to_thread(redis.start)
        back = time.monotonic()
        await asyncio.sleep(args.outage_after)
        stop.set()
        await asyncio.gather(*tasks)
    ended = time.monotonic()
    in_flight = [o for o in outs if o.start < killed < o.end and o.status == 200]
    during = [o for o in outs if killed < o.start and o.end < restarted]
    after = sorted((o for o in outs if o.start > back), key=lambda o: o.start)
    first_ok = next((o.start for o in after if o.status == 200), None)  # admitted: status came with 1st token
    not_ready = [t for t, s in ready if s != 200]
    ready_again = next((t for t, s in ready if t > back and s == 200), None)
    t0 = time.monotonic()
    while redis.leases("soak") and time.monotonic() - t0 < 60:
        await asyncio.sleep(0.5)
    m = metrics(base_url)
    return {"outage_s": round(back - killed, 2), "requests": len(outs),
            "in_flight_at_kill": len(in_flight), "in_flight_ended_with_done": sum(o.done for o in in_flight),
            "in_flight_error_events": sum(o.error_event for o in in_flight),
            "new_during_outage": len(during), "new_during_outage_statuses": _count(o.status for o in during),
            "new_during_outage_with_retry_after": sum(o.retry_after for o in during),
            "5xx_other_than_503": sum(o.status >= 500 and o.status != 503 for o in outs),
            "first_200_after_restart_s": None if first_ok is None else round(first_ok - back, 2),
            "not_ready_window_s": round(max(not_ready) - min(not_ready), 2) if not_ready else 0.0,
            "ready_again_after_restart_s": None if ready_again is None else round(ready_again - back, 2),
            "leases_zero_after_load_s": round(time.monotonic() - ended, 1), "leases_left": redis.leases("soak"),
            "store_errors": m.get("conveyor_store_errors_total", 0), "usage_lost": m.get("conveyor_usage_lost_total", 0)}


async def phase_sigterm(server: ServerProcess, args) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=300) as client:
        tasks = [asyncio.ensure_future(stream(client, args.long_tokens, None)) for _ in range(args.concurrency)]
        await asyncio.sleep(args.outage_after)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        outs = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(server.proc.wait, 120)
        exit_s = time.monotonic() - t0
    return {"streams": len(outs), "ended_with_done": sum(o.done for o in outs),
            "with_error_event": sum(o.error_event for o in outs), "cut_without_done": sum(not o.done for o in outs),
            "statuses": _count(o.status for o in outs), "exit_code": code, "exit_after_sigterm_s": round(exit_s, 1),
            "shutdown_timeout_s": args.shutdown_timeout}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {status}" for status, n in counts.items()) or "none"


def markdown(r: dict, args, command: str) -> str:
    a, b, c, m = r["streams"], r["redis"], r["sigterm"], r["machine"]
    return f"""## Reliability soak (`benchmarks/soak.py`)

{m['date']}, {m['cpu']} ({m['cores']} cores, load average {m['load_avg'][0]:.1f} at the start: a shared,
busy machine), model `{ {'tiny': 'tiny random Llama (2 layers, hidden 64)', 'default': 'SmolLM2-135M-Instruct'}.get(args.model, args.model)}`, one server process on one
`redis-server` (AOF, fsync always), tenant with limits (so every request takes a lease and settles).
Command: `{command}`

**Streams with disconnects** ({a['requests']} streamed chat requests, {args.concurrency} at a time,
max_tokens {args.max_tokens}, {args.disconnect:.0%} drop the connection after a random number of events):

| requests | disconnects | completed with [DONE] | 5xx | other errors | running / waiting after | KV blocks leaked | idle after | RSS after warm-up -> after |
|---:|---:|---:|---:|---:|---|---:|---:|---|
| {a['requests']} | {a['disconnects']} | {a['completed_with_done']} | {a['5xx']} | {a['other_errors']} | {a['running_after']:.0f} / {a['waiting_after']:.0f} | {a['blocks_leaked']} | {a['seconds_to_idle']} s | {a['rss_before_mib']} -> {a['rss_after_mib']} MiB ({(a['rss_after_mib'] / a['rss_before_mib'] - 1) * 100:+.1f}%) |

**Redis killed with -9 under load and restarted with its AOF** ({args.concurrency} clients streaming
in a loop; Redis down {b['outage_s']} s): {b['in_flight_at_kill']} streams in flight at the kill,
{b['in_flight_ended_with_done']} ended with `[DONE]`, {b['in_flight_error_events']} with an error event;
{b['new_during_outage']} new requests during the outage got {_statuses(b['new_during_outage_statuses'])}
({b['new_during_outage_with_retry_after']} with `Retry-After`); 5xx other than 503: {b['5xx_other_than_503']};
`/ready` answered 503 for {b['not_ready_window_s']} s and 200 again {b['ready_again_after_restart_s']} s
after the restart; the first request admitted again was sent {b['first_200_after_restart_s']} s after it;
store errors counted {b['store_errors']:.0f}, usage records lost {b['usage_lost']:.0f}; the tenant's
concurrency leases were back to {b['leases_left']} {b['leases_zero_after_load_s']} s after the load stopped.

**SIGTERM with {c['streams']} streams in flight** (max_tokens {args.long_tokens}, `--shutdown-timeout
{c['shutdown_timeout_s']}`): {c['ended_with_done']} ended with `[DONE]` ({c['with_error_event']} of them
after an in-band error event), {c['cut_without_done']} cut without it; the process exited with code
{c['exit_code']} {c['exit_after_sigterm_s']} s after the signal.
"""


async def main_async(args) -> dict:
    work = tempfile.mkdtemp(prefix="conveyor-soak-")
    redis = Redis(work)
    redis.start()
    cfg = os.path.join(work, "soak.toml")
    with open(cfg, "w") as f:
        f.write(f'redis_url = "{redis.url}"\n\n[[tenants]]\nname = "soak"\napi_key_sha256 = ["{hash_key(KEY)}"]\n'
                f"max_concurrent = {args.concurrency * 4}\nrequests_per_minute = 1000000\n"
                f"tokens_per_minute = 1000000000\n")
    port = free_port()
    cmd = [sys.executable, "-m", "conveyor", "serve", "--port", str(port), "--config", cfg,
           "--shutdown-timeout", str(args.shutdown_timeout), "--log-level", "warning"]
    if args.model == "tiny":
        from tests.checkpoints import make_tiny_checkpoint

        # one thread: on a shared 2-core machine two threads spin against each other (7x slower steps)
        cmd += ["--model", make_tiny_checkpoint(os.path.join(work, "tiny-llama")), "--num-threads", "1",
                "--num-blocks", "4096"]
    elif args.model != "default":
        cmd += ["--model", args.model]
    result: dict = {"machine": machine_info(), "args": vars(args)}
    try:
        server = ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path=os.path.join(work, "server.log"),
                               health_path="/health")
        with server:
            pid = server.proc.pid
            result["streams"] = await phase_streams(server.base_url, pid, args)
            print(json.dumps(result["streams"]), flush=True)
            result["redis"] = await phase_redis(server.base_url, redis, args)
            print(json.dumps(result["redis"]), flush=True)
            result["sigterm"] = await phase_sigterm(server, args)
            print(json.dumps(result["sigterm"]), flush=True)
    finally:
        if redis.proc is not None and redis.proc.poll() is None:
            redis.proc.terminate()
            redis.proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--disconnect", type=float, default=0.2, help="fraction of streams dropped mid-way")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=512, help="max_tokens of the SIGTERM phase's streams")
    p.add_argument("--outage-after", type=float, default=4.0, help="seconds of load before the kill / signal")
    p.add_argument("--outage-s", type=float, default=4.0, help="seconds Redis stays down")
    p.add_argument("--shutdown-timeout", type=float, default=5.0)
    p.add_argument("--model", default="tiny", help="tiny (a tiny random Llama), default (SmolLM2-135M) "
                   "or a checkpoint path")
    p.add_argument("--out-dir", default="benchmarks/results/soak")
    args = p.parse_args(argv)
    if shutil.which("redis-server") is None:
        p.error("redis-server is not installed (apt-get install -y redis-server)")
    result = asyncio.run(main_async(args))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result, args, "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
