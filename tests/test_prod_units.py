"""Unit tests of the production layer's pieces (no server): config files, PII redaction on
whole texts and on randomly chunked streams, the blocklist filter, routing, rate limiting,
idempotency expiry and auth. The HTTP behaviour is in test_prod_api.py / test_prod_redis.py."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from conveyor.cli import main as cli_main
from server.auth import Authenticator, hash_key
from server.config_file import ModelConfig, PriceConfig, RoutingConfig, RoutingRule, TenantConfig, \
    config_from_dict, load_config
from server.errors import APIError
from server.guardrails import BlocklistGuard
from server.idempotency import Idempotency, fingerprint
from server.pii import StreamRedactor, luhn_ok, redact
from server.rate_limit import RateLimiter, duration
from server.recorded import RecordedResponse
from server.routing import Router, complexity
from server.store import MemoryStore, StoreUnavailable
from server.usage import UsageLog, UsageRecord
from tests.test_prod_harness import FlakyStore

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "conveyor.example.toml"


# ---- config files -----------------------------------------------------------------------
def test_example_config_loads_and_yaml_matches_toml(tmp_path):
    cfg = load_config(EXAMPLE)
    assert [m.name for m in cfg.models] and cfg.tenants and cfg.idempotency.ttl_seconds == 86400
    import tomllib

    import yaml

    data = tomllib.loads(EXAMPLE.read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("data, field", [
    ({"tenants": [{"name": "a", "tokens_per_minute": "lots"}]}, "tenants[0].tokens_per_minute"),
    ({"tenants": [{"name": "a", "tokens_per_mnute": 5}]}, "tenants[0]: unknown field"),
    ({"tenants": [{"name": "a", "guards": ["nope"]}]}, "tenants[0].guards"),
    ({"guards": {"g": {"type": "virus_scan"}}}, "guards.g.type"),
    ({"models": [{"name": "m", "price": {"prompt_per_1k": True}}]}, "models[0].price.prompt_per_1k"),
    ({"cache": {"ttl_seconds": 0}}, "ttl_seconds"),
])
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(data)


def test_cli_hash_key_and_bad_config(tmp_path, capsys):
    assert cli_main(["hash-key", "sk-abc"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-abc")
    (tmp_path / "c.toml").write_text("[[tenants]]\nname = 1\n")
    assert cli_main(["serve", "--config", str(tmp_path / "c.toml")]) == 2
    assert "tenants[0].name" in capsys.readouterr().err


# ---- auth -------------------------------------------------------------------------------
def test_auth_open_without_keys_and_strict_with_them():
    open_auth = Authenticator([TenantConfig(name="x")])
    assert open_auth.is_open and open_auth.authenticate(None).name == "anonymous"
    auth = Authenticator([TenantConfig(name="t", api_key_sha256=[hash_key("sk-right-key")])])
    assert auth.authenticate("Bearer sk-right-key").name == "t"
    for header in (None, "Bearer sk-wrong-key", "Basic sk-right-key"):
        with pytest.raises(APIError) as err:
            auth.authenticate(header)
        assert err.value.status == 401
    with pytest.raises(ValueError, match="both"):
        Authenticator([TenantConfig("a", [hash_key("k")]), TenantConfig("b", [hash_key("k")])])


# ---- PII ----------------------------------------------------------------------------------
TEXTS = [
    "Mail john.doe+x@example.co.uk, or call (555) 123-4567 or +1 555.987.6543.",
    "Card 4111 1111 1111 1111 and 4111-1111-1111-1112 (bad Luhn), SSN 123-45-6789, "
    "IPs 192.168.0.12, 2001:db8::1 and fe80:0:0:0:0:0:0:1.",
    "Not PII: 1234567890123, 10.0.0.256, a@b.c, 000-12-3456; but x@y.com. and 5551234567!",
]


def test_redact_whole_texts():
    assert redact(TEXTS[0]) == ("Mail [EMAIL], or call [PHONE] or [PHONE].", 3)
    assert redact(TEXTS[1])[0] == ("Card [CREDIT_CARD] and 4111-1111-1111-1112 (bad Luhn), SSN [SSN], "
                                   "IPs [IP_ADDRESS], [IP_ADDRESS] and [IP_ADDRESS].")
    assert redact(TEXTS[2])[0] == ("Not PII: 1234567890123, 10.0.0.256, a@b.c, 000-12-3456; "
                                   "but [EMAIL]. and [PHONE]!")
    assert redact(TEXTS[0], ("phone",))[0] == "Mail john.doe+x@example.co.uk, or call [PHONE] or [PHONE]."
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_stream_redaction_equals_whole_text_for_random_chunkings():
    rng = random.Random(1)
    for _ in range(150):
        text = " ".join(rng.choice(TEXTS) for _ in range(2))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        r = StreamRedactor()
        out = "".join(r.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)]))
        out += r.feed("", final=True)
        assert out == redact(text)[0]
        assert r.redactions == redact(text)[1]


def test_stream_redaction_holds_back_only_what_a_match_could_need():
    r = StreamRedactor()
    assert r.feed("Hello there, my mail is jo") == "Hello there, my mail is "
    assert r.feed("hn@exa") == ""  # could still be an email
    assert r.feed("mple.com and") == "[EMAIL] "
    assert r.feed(" more", final=True) == "and more"


def test_blocklist_filter_catches_phrases_split_across_chunks():
    f = BlocklistGuard("b", ["forbidden fruit"]).output_filter()
    assert f.feed("eat the forb", False).text == "eat the "
    out = f.feed("idden fruit now", False)
    assert out.blocked and out.text == ""
    g = BlocklistGuard("b", ["forbidden fruit"]).output_filter()
    assert g.feed("the forbidden", False).text == "the "
    assert g.feed(" city", True).text == "forbidden city"


# ---- routing ----------------------------------------------------------------------------
def test_complexity_grows_with_hard_signals():
    easy, hard = complexity("What is 2+2?"), complexity("Prove the theorem step by step:\n```\ndef f(): pass\n```")
    assert 0 <= easy < 0.1 < hard <= 1


def test_router_rules_default_and_cost_ceiling():
    models = [ModelConfig("s", price=PriceConfig(1.0, None, 1.0)), ModelConfig("l", price=PriceConfig(10.0, None, 10.0))]
    router = Router(RoutingConfig([RoutingRule("s", max_prompt_tokens=100, max_tokens=50)]), models)
    anyone = TenantConfig("t")
    assert router.choose(anyone, 10, 10, "hi").model == "s"
    assert router.choose(anyone, 500, 10, "hi").model == "l"
    capped = TenantConfig("c", max_cost_per_request=1.0)  # l costs 5.1, s 0.51
    assert router.choose(capped, 500, 10, "hi") == router.choose(capped, 500, 10, "hi")
    assert router.choose(capped, 500, 10, "hi").model == "s"
    assert router.choose(TenantConfig("c", max_cost_per_request=0.001), 500, 10, "hi").model == "s"
    assert router.choose(TenantConfig("o", models=["l"]), 10, 10, "hi").model == "l"


# ---- rate limits and idempotency on the memory store -----------------------------------
def test_rate_limiter_reserves_undoes_and_settles():
    async def run() -> None:
        limiter = RateLimiter(MemoryStore(), window_seconds=3600)
        t = TenantConfig("t", tokens_per_minute=100, requests_per_minute=10, max_concurrent=2)
        a = await limiter.reserve(t, 60)
        assert a.headers["x-ratelimit-remaining-tokens"] == "40"
        with pytest.raises(APIError) as err:
            await limiter.reserve(t, 50)
        assert err.value.status == 429 and err.value.headers["x-ratelimit-remaining-requests"] == "9"
        await a.settle(20)
        await a.settle(99)  # a second settle counts nothing
        b = await limiter.reserve(t, 50)
        assert b.headers["x-ratelimit-remaining-tokens"] == "30"
        c = await limiter.reserve(t, 1)
        with pytest.raises(APIError, match="concurrent"):
            await limiter.reserve(t, 1)
        await c.settle(1)
        await limiter.reserve(t, 1)
    asyncio.run(run())
    assert duration(0.2) == "200ms" and duration(17.2) == "18s" and duration(360) == "6m0s"


def test_idempotency_keys_expire_after_ttl():
    async def run() -> None:
        idem = Idempotency(MemoryStore(), ttl_seconds=0.1)
        fp = fingerprint({"prompt": "x"})
        assert await idem.begin("t", "k", fp) is None
        await idem.complete("t", "k", fp, RecordedResponse(200, body={"ok": 1}))
        assert (await idem.begin("t", "k", fp)).body == {"ok": 1}
        await asyncio.sleep(0.15)
        assert await idem.begin("t", "k", fp) is None  # expired: runs again
    asyncio.run(run())
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})


def test_idempotency_join_in_flight_waits_for_the_first():
    async def run() -> None:
        idem = Idempotency(MemoryStore(), join_in_flight=True)
        fp = fingerprint({"prompt": "y"})
        assert await idem.begin("t", "k", fp) is None
        waiter = asyncio.ensure_future(idem.begin("t", "k", fp))
        await asyncio.sleep(0.12)
        assert not waiter.done()  # still running: the retry waits instead of a 409
        await idem.complete("t", "k", fp, RecordedResponse(200, events=["data: [DONE]\n\n"]))
        assert (await asyncio.wait_for(waiter, 2)).events == ["data: [DONE]\n\n"]
    asyncio.run(run())


# ---- outages: leases, settlement, fail open/closed, key hints ----------------------------
def test_concurrency_leases_lapse_after_a_crash_and_never_go_negative():
    async def run() -> None:
        store = MemoryStore()
        crashed = RateLimiter(store, lease_seconds=0.3)
        t = TenantConfig("t", max_concurrent=8)
        held = [await crashed.reserve(t, 1) for _ in range(8)]
        assert all(r.lease for r in held)
        with pytest.raises(APIError, match="concurrent"):
            await crashed.reserve(t, 1)
        await crashed.leases.close()  # the replica dies: nothing released, nothing refreshed
        await asyncio.sleep(0.35)
        other = RateLimiter(store, lease_seconds=0.3)
        fresh = [await other.reserve(t, 1) for _ in range(8)]  # full concurrency again
        for r in held + fresh:
            await r.settle(1)  # late releases of lapsed leases do nothing
        assert await store.lease_count("rl:t:conc") == 0
        # a running request's lease is refreshed past its ttl, and released at the end
        long = await other.reserve(t, 1)
        await asyncio.sleep(0.5)
        assert await store.lease_count("rl:t:conc") == 1
        await long.settle(1)
        assert await store.lease_count("rl:t:conc") == 0 and other.leases.held == 0
    asyncio.run(run())


def test_outage_admission_is_503_or_fail_open_and_settlement_never_raises():
    async def run() -> None:
        store = FlakyStore()
        lost: list[str] = []
        store.observer.lost = lost.append
        t = TenantConfig("t", tokens_per_minute=100, requests_per_minute=10, max_concurrent=2)
        closed = RateLimiter(store, 3600, lease_seconds=0.25)
        opened = RateLimiter(store, 3600, fail_open=True)
        res = await closed.reserve(t, 60)
        store.down = True
        with pytest.raises(StoreUnavailable) as err:
            await closed.reserve(t, 10)
        assert err.value.status == 503 and err.value.retry_after and isinstance(err.value, APIError)
        free = await opened.reserve(t, 10)
        assert free.unlimited and free.headers == {} and free.lease is None
        await free.settle(3)
        await res.settle(20)  # does not raise; waits in the background
        assert closed.settler.pending == 1
        store.down = False
        await asyncio.sleep(0.3)
        assert closed.settler.pending == 0 and lost == []
        assert await store.inner.get(f"rl:t:tok:{res.window}") == "20"
        # its release missed the outage, so the slot lapsed within the lease ttl instead
        assert closed.leases.held == 0 and await store.inner.lease_count("rl:t:conc") == 0
        # a record that cannot be written within the budget is counted lost
        usage = UsageLog(store)
        usage.settler.budget_seconds = 0.3
        store.down = True
        await usage.record(UsageRecord(0.0, "r1", "t", None, None, "m", "1", 1, 0, 1, 0.0))
        await asyncio.sleep(0.5)
        assert lost == ["record"] and usage.settler.pending == 0
    asyncio.run(run())


def test_idempotency_outcomes_survive_an_outage():
    async def run() -> None:
        store = FlakyStore()
        idem = Idempotency(store)
        fp = fingerprint({"prompt": "z"})
        assert await idem.begin("t", "k", fp) is None
        store.down = True
        with pytest.raises(StoreUnavailable):
            await idem.begin("t", "k2", fp)
        await idem.abandon("t", "k")  # never raises; done once the store is back
        store.down = False
        await asyncio.sleep(0.3)
        assert await idem.begin("t", "k", fp) is None  # the key was freed
        # a stale abandon never frees a key another request now holds
        await idem.abandon("t", "k-unknown")
        assert await store.inner.get(idem._key("t", "k")) is not None
    asyncio.run(run())


def test_wrong_keys_are_never_echoed_beyond_four_characters():
    auth = Authenticator([TenantConfig(name="t", api_key_sha256=[hash_key("sk-right-key")])])
    for wrong in ("sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789wxyz", "sk-short", "x"):
        with pytest.raises(APIError) as err:
            auth.authenticate(f"Bearer {wrong}")
        message = err.value.message
        assert wrong not in message and wrong[:4] not in message.replace("****", "")
        visible = message.split("provided: ")[1].rstrip(".").replace("*", "")
        assert len(visible) <= 4 and (visible == "" or wrong.endswith(visible))
