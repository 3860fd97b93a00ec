"""Shared state across replicas, against a real `redis-server`: two server instances on two
ports share one Redis; a tenant's limit holds across both, an idempotency key used on one is
replayed (or refused while running) on the other, concurrency slots (leases) are counted
across both, and usage from both rolls up on either.

Redis comes from $CONVEYOR_TEST_REDIS_URL, else a `redis-server` on PATH started on a free
loopback port; on CI ($CI set) a missing server is a failure, not a skip.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid

import httpx
import pytest

from server.auth import hash_key
from server.config_file import config_from_dict
from server.redis_store import RedisStore
from tests.test_prod_harness import ProdServer, echo_engine, redis_server

RUN = uuid.uuid4().hex[:8]  # names unique to this run: the Redis may outlive it
TENANTS = {"limited": f"limited-{RUN}", "free": f"free-{RUN}", "ops": f"ops-{RUN}", "pair": f"pair-{RUN}"}
KEYS = {t: f"sk-{t}-{RUN}" for t in TENANTS}


@pytest.fixture(scope="module")
def redis_url():
    server = redis_server()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def replicas(redis_url):
    production = config_from_dict({
        "redis_url": redis_url,
        "rate_limit_window_seconds": 86400,
        "tenants": [
            {"name": TENANTS["limited"], "api_key_sha256": [hash_key(KEYS["limited"])], "requests_per_minute": 3},
            {"name": TENANTS["free"], "api_key_sha256": [hash_key(KEYS["free"])]},
            {"name": TENANTS["ops"], "api_key_sha256": [hash_key(KEYS["ops"])], "admin": True},
            {"name": TENANTS["pair"], "api_key_sha256": [hash_key(KEYS["pair"])], "max_concurrent": 2},
        ]})
    servers = [ProdServer(echo_engine(f"echo-{i}"), production).start() for i in range(2)]
    yield [httpx.Client(base_url=s.base_url, timeout=60) for s in servers]
    for s in servers:
        s.stop()


def post(client, tenant, prompt, headers=None, **body):
    return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0, **body},
                       headers={"Authorization": f"Bearer {KEYS[tenant]}", **(headers or {})})


def test_tenant_limit_holds_across_replicas(replicas):
    a, b = replicas
    assert post(a, "limited", "one").status_code == 200
    assert post(b, "limited", "two").status_code == 200
    third = post(a, "limited", "three")
    assert third.status_code == 200 and third.headers["x-ratelimit-remaining-requests"] == "0"
    refused = post(b, "limited", "four")
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_idempotency_key_is_shared_by_replicas(replicas):
    a, b = replicas
    key = {"Idempotency-Key": f"pay-{RUN}"}
    first = post(a, "free", "charge the card", headers=key, temperature=0.8)
    replay = post(b, "free", "charge the card", headers=key, temperature=0.8)
    assert first.status_code == 200 and replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == first.json()
    assert post(b, "free", "another body", headers=key).status_code == 422
    slow = {"Idempotency-Key": f"slow-{RUN}"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, a, "free", "long job", slow, max_tokens=60, ignore_eos=True)
        time.sleep(0.2)
        assert post(b, "free", "long job", slow, max_tokens=60, ignore_eos=True).status_code == 409
        assert running.result().status_code == 200


def test_concurrency_slots_are_leases_shared_by_replicas(replicas, redis_url):
    import redis

    a, b = replicas
    leases = redis.Redis.from_url(redis_url)
    key = f"rl:{TENANTS['pair']}:conc"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(post, c, "pair", "a long one", max_tokens=150, ignore_eos=True) for c in (a, b)]
        deadline = time.monotonic() + 30
        while leases.zcard(key) < 2:
            assert time.monotonic() < deadline and not any(f.done() for f in running)
            time.sleep(0.02)
        refused = post(a, "pair", "a third one")
        assert refused.status_code == 429 and "concurrent" in refused.json()["error"]["message"]
        assert all(f.result().status_code == 200 for f in running)
    assert leases.zcard(key) == 0  # released at the end, not left to lapse
    assert post(b, "pair", "now there is room").status_code == 200


def test_usage_from_both_replicas_rolls_up_on_either(replicas):
    a, b = replicas
    post(a, "free", "usage a")
    post(b, "free", "usage b")
    for client in (a, b):
        rows = client.get("/v1/usage", params={"group_by": "tenant"},
                          headers={"Authorization": f"Bearer {KEYS['ops']}"}).json()["data"]
        mine = {r["tenant"]: r for r in rows}
        assert mine[TENANTS["free"]]["requests"] >= 3  # this test's two + the idempotency test's
        assert mine[TENANTS["limited"]]["requests"] == 3


def test_redis_store_primitives(redis_url):
    async def run() -> None:
        store = RedisStore(redis_url)
        try:
            key = f"t:{RUN}:{uuid.uuid4().hex}"
            results = await asyncio.gather(*[store.set_if_absent(key, str(i), ttl=5) for i in range(8)])
            assert sorted(results) == [False] * 7 + [True]
            assert await store.incr(key + ":n", 5, ttl=0.2) == 5
            assert await store.incr(key + ":n", -2, ttl=0.2) == 3
            await asyncio.sleep(0.4)
            assert await store.get(key + ":n") is None  # the window's ttl came from its first incr
            for i in range(5):
                await store.append(key + ":list", str(i), max_items=3)
            assert await store.items(key + ":list") == ["2", "3", "4"]
        finally:
            await store.close()

    asyncio.run(run())
