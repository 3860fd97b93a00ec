"""Shared-state outages against a real `redis-server` this test owns (it kills it with -9 and
restarts it on the same port with its AOF data):

- the store fails fast with StoreUnavailable while Redis is down, reports `healthy` false, and
  recovers by itself (background ping) once Redis is back;
- concurrency leases of a crashed replica lapse within one lease ttl, with and without a Redis
  restart that brings the leases back from its AOF;
- settlements made during the outage are written once Redis is back;
- over HTTP: streams in flight when Redis dies end with `[DONE]` and no error event, new
  requests of a limited tenant get 503 + Retry-After (fail_open = false) or 200 (true),
  `/ready` says 503 while the store is down, and after the restart it is ready again, limits
  apply again and the usage of the requests that ended during the outage is in the store.

Needs `redis-server` on PATH (an external $CONVEYOR_TEST_REDIS_URL cannot be killed): a skip
without it, a failure on CI (tests/system_deps.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import httpx
import pytest

from server.auth import hash_key
from server.config_file import TenantConfig, config_from_dict
from server.rate_limit import RateLimiter
from server.redis_store import RedisStore
from server.store import StoreUnavailable
from tests.system_deps import require_binary

LEASE_TTL = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KillableRedis:
    """`redis-server` with AOF (fsync on every write) on a fixed loopback port, so it can be
    killed with -9 and restarted with its data."""

    def __init__(self) -> None:
        self.binary = require_binary("redis-server", "the store-outage tests kill and restart a real Redis",
                                     "redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="conveyor-redis-outage-")
        self.process: subprocess.Popen | None = None

    def start(self) -> "KillableRedis":
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.RedisError:  # refused, or still loading its AOF
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def redis_proc():
    server = KillableRedis().start()
    yield server
    server.stop()


async def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


# ---- the store itself ----------------------------------------------------------------------
def test_store_fails_fast_while_down_and_recovers_by_itself(redis_proc):
    async def run() -> None:
        store = RedisStore(redis_proc.url)
        errors: list[str] = []
        store.observer.error = errors.append
        try:
            await store.set("k", "v")
            assert store.healthy
            redis_proc.kill()
            for op in (lambda: store.get("k"), lambda: store.incr("n", 1, ttl=5),
                       lambda: store.lease_acquire("l", "a", 2, 5)):
                start = time.monotonic()
                with pytest.raises(StoreUnavailable) as err:
                    await op()
                assert time.monotonic() - start < 2.0 and err.value.status == 503
            assert not store.healthy and errors[:1] == ["get"]
            redis_proc.start()
            # no traffic needed: the background ping notices the recovery
            assert await _until(lambda: asyncio.sleep(0, store.healthy), 5)
            assert await store.get("k") == "v"  # AOF brought the data back
        finally:
            await store.close()
    asyncio.run(run())


def test_a_hung_redis_costs_one_socket_timeout_then_fails_at_once(redis_proc):
    async def run() -> None:
        store = RedisStore(redis_proc.url, socket_timeout=0.5, ping_interval=0.2)
        try:
            await store.set("k", "v")
            redis_proc.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
            try:
                start = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await store.get("k")
                assert time.monotonic() - start < 2.0  # about one 0.5 s socket timeout (redis-py's default: 5 s)
                start = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await store.incr("n", 1)
                assert time.monotonic() - start < 0.5  # known down: fails at once, no timeout
            finally:
                redis_proc.process.send_signal(signal.SIGCONT)
            assert await _until(lambda: asyncio.sleep(0, store.healthy), 5)
            assert await store.get("k") == "v"
        finally:
            await store.close()
    asyncio.run(run())


@pytest.mark.parametrize("restart", [False, True], ids=["redis-up", "redis-restarted-with-aof"])
def test_crashed_replicas_leases_lapse_within_one_ttl(redis_proc, restart):
    tenant = TenantConfig(f"t-{uuid.uuid4().hex[:6]}", max_concurrent=8)
    key = f"rl:{tenant.name}:conc"

    async def crash() -> None:  # one replica: 8 running requests, then it dies
        store = RedisStore(redis_proc.url)
        limiter = RateLimiter(store, lease_seconds=LEASE_TTL)
        held = [await limiter.reserve(tenant, 1) for _ in range(8)]
        assert all(r.lease for r in held) and await store.lease_count(key) == 8
        await asyncio.sleep(LEASE_TTL * 0.6)  # refreshed at least once while "running"
        assert await store.lease_count(key) == 8
        await limiter.leases.close()
        await store.close()

    asyncio.run(crash())
    if restart:
        redis_proc.kill()
        redis_proc.start()

    async def after() -> None:  # another replica, on the (restarted) Redis
        store = RedisStore(redis_proc.url)
        limiter = RateLimiter(store, lease_seconds=LEASE_TTL)
        try:
            if restart:
                assert await store.lease_count(key) == 8  # the AOF kept them...
            assert await _until(lambda: _zero(store, key), LEASE_TTL + 1)  # ...for one ttl at most
            fresh = [await limiter.reserve(tenant, 1) for _ in range(8)]  # full concurrency
            assert await store.lease_count(key) == 8
            for r in fresh:
                await r.settle(1)
                await r.settle(1)  # settling twice releases once
            assert await store.lease_count(key) == 0
        finally:
            await limiter.leases.close()
            await store.close()

    asyncio.run(after())


async def _zero(store: RedisStore, key: str) -> bool:
    return await store.lease_count(key) == 0


def test_settlements_during_an_outage_are_written_after_the_restart(redis_proc):
    tenant = TenantConfig(f"t-{uuid.uuid4().hex[:6]}", tokens_per_minute=1000)

    async def run() -> None:
        store = RedisStore(redis_proc.url)
        limiter = RateLimiter(store, 3600)
        try:
            res = await limiter.reserve(tenant, 500)
            redis_proc.kill()
            start = time.monotonic()
            await res.settle(120)  # never raises, never waits long
            assert time.monotonic() - start < 2.0 and limiter.settler.pending == 1
            redis_proc.start()
            assert await _until(lambda: asyncio.sleep(0, limiter.settler.pending == 0), 8)
            assert await store.get(f"rl:{tenant.name}:tok:{res.window}") == "120"
        finally:
            await store.close()
    asyncio.run(run())


# ---- over HTTP ------------------------------------------------------------------------------
@pytest.fixture
def servers(redis_proc):
    from tests.test_prod_harness import ProdServer, echo_engine

    run = uuid.uuid4().hex[:6]

    def start(fail_open: bool):
        name = f"{'open' if fail_open else 'closed'}-{run}"
        production = config_from_dict({
            "redis_url": redis_proc.url, "store": {"fail_open": fail_open},
            "tenants": [{"name": name, "api_key_sha256": [hash_key(f"sk-{name}-key")],
                         "requests_per_minute": 1000, "max_concurrent": 16,
                         "tokens_per_minute": 10 ** 7},
                        {"name": f"ops-{name}", "api_key_sha256": [hash_key(f"sk-ops-{name}")],
                         "admin": True}]})
        server = ProdServer(echo_engine(name, step_delay=0.02), production).start()
        return server, f"sk-{name}-key", f"sk-ops-{name}"

    started = [start(False), start(True)]
    yield started
    for server, _, _ in started:
        server.stop()


def _stream(base_url: str, key: str, started: threading.Semaphore) -> tuple[int, list[str]]:
    body = {"prompt": "the quick brown fox", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        started.release()  # headers are sent once the first token is out: it runs
        return r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")]


def _post(base_url: str, key: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/completions", timeout=30,
                      json={"prompt": "hi there", "max_tokens": 3},
                      headers={"Authorization": f"Bearer {key}"})


def test_redis_killed_mid_stream_streams_finish_new_requests_degrade(redis_proc, servers):
    (closed, closed_key, ops_key), (opened, open_key, _) = servers
    assert _post(closed.base_url, closed_key).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = threading.Semaphore(0)
        streams = [pool.submit(_stream, s.base_url, k, started) for s, k in
                   [(closed, closed_key)] * 4 + [(opened, open_key)] * 4]
        for _ in streams:
            assert started.acquire(timeout=30)
        assert httpx.get(closed.base_url + "/ready", timeout=10).status_code == 200
        redis_proc.kill()  # while all 8 streams run (60 steps of 20 ms each)
        refused = _post(closed.base_url, closed_key)
        admitted = _post(opened.base_url, open_key)
        results = [f.result() for f in streams]
    for status, events in results:
        assert status == 200 and events[-1] == "data: [DONE]"
        assert not any('"error"' in e for e in events)
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"  # all 60 tokens
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "store_unavailable"
    assert admitted.status_code == 200 and "x-ratelimit-limit-requests" not in admitted.headers

    not_ready = httpx.get(closed.base_url + "/ready", timeout=10)
    assert not_ready.status_code == 503 and "store" in " ".join(not_ready.json()["reasons"])
    # fail_open still serves during the outage, so it stays in the load balancer
    assert httpx.get(opened.base_url + "/ready", timeout=10).status_code == 200
    assert closed.metric("conveyor_store_errors_total") >= 1

    redis_proc.start()
    deadline = time.monotonic() + 10
    while httpx.get(closed.base_url + "/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the store came back"
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while (r := _post(closed.base_url, closed_key)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "1000"
    # the usage of the streams that ended during the outage reaches the store after it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = httpx.get(closed.base_url + "/v1/usage", headers={"Authorization": f"Bearer {ops_key}"},
                         timeout=10).json()["data"]
        if sum(row["requests"] for row in rows) >= 2 + 4 + 1 + 4:  # closed: 2 + 4 streams, open: 1 + 4
            break
        time.sleep(0.2)
    by_tenant = {row["tenant"]: row["requests"] for row in rows}
    assert by_tenant == {closed_key[3:-4]: 6, open_key[3:-4]: 5}, json.dumps(rows)
    assert closed.metric("conveyor_usage_lost_total") == 0 and opened.metric("conveyor_usage_lost_total") == 0
