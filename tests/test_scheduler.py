"""Scheduler and KV cache manager without a model: a fake "model" appends a token that is a
deterministic function of the sequence so far, which lets us check that preemption, chunking and
prefix caching never change what a request sees."""
import random
import time

import pytest

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler.policy import make_policy
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.scheduler import Scheduler, SchedulerConfig


def fake_next_token(tokens: list[int]) -> int:
    return (sum(tokens[-3:]) * 31 + len(tokens)) % 1000


def make_request(rid, prompt, max_tokens, priority=0, salt=None, tenant=None, arrival=None):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens,
                   time.time() if arrival is None else arrival, priority, salt, tenant)


def run_to_completion(sched: Scheduler, requests, max_steps=10_000, on_step=None):
    """Runs the fake model; returns {request_id: output tokens} and the per-step outputs."""
    for r in requests:
        sched.add_request(r)
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        for req, n in out.scheduled:
            blocks = sched.kv.block_ids(req.request_id)
            assert len(blocks) * sched.kv.block_size >= req.num_computed_tokens + n
        sched.advance(out)
        steps.append(out)
        for req, n in out.scheduled:
            if req.num_computed_tokens == req.num_tokens:
                req.append_output_token(fake_next_token(req.all_token_ids))
                if req.num_output_tokens >= req.max_tokens:
                    sched.finish_request(req, RequestStatus.FINISHED_LENGTH)
        sched.kv.check_integrity()
        if on_step:
            on_step(out)
    assert not sched.has_unfinished()
    return {r.request_id: list(r.output_token_ids) for r in requests}, steps


def expected_output(prompt, max_tokens):
    toks = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = fake_next_token(toks)
        toks.append(t)
        out.append(t)
    return out


def random_workload(seed, n=12):
    rng = random.Random(seed)
    return [(f"r{i}", [rng.randrange(1000) for _ in range(rng.randint(1, 70))], rng.randint(1, 40)) for i in range(n)]


def build(num_blocks, budget=64, max_seqs=8, caching=True, policy="fcfs", block_size=4):
    kv = KVCacheManager(num_blocks, block_size, caching)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=4096)
    return Scheduler(cfg, kv, make_policy(policy))


@pytest.mark.parametrize("num_blocks,budget", [(1000, 512), (40, 16), (30, 7)])
@pytest.mark.parametrize("caching", [True, False])
def test_outputs_independent_of_budget_preemption_and_caching(num_blocks, budget, caching):
    work = random_workload(1)
    sched = build(num_blocks, budget=budget, caching=caching)
    outputs, _ = run_to_completion(sched, [make_request(r, p, m) for r, p, m in work])
    for rid, prompt, max_tokens in work:
        assert outputs[rid] == expected_output(prompt, max_tokens)
    assert sched.kv.num_free_blocks == num_blocks
    if num_blocks == 30:
        assert sched.num_preemptions > 0  # the tiny cache really forced preemption


def test_chunked_prefill_splits_long_prompt_under_budget():
    sched = build(100, budget=8)
    req = make_request("a", list(range(30)), 2)
    _, steps = run_to_completion(sched, [req])
    chunk_sizes = [n for s in steps for r, n in s.scheduled]
    assert chunk_sizes[:4] == [8, 8, 8, 6]


def test_prefix_cache_reuses_shared_blocks_and_counts_hits():
    sched = build(100, budget=256, block_size=4)
    shared = list(range(100, 140))  # 40 tokens = 10 full blocks
    first = make_request("a", shared + [1, 2], 3)
    run_to_completion(sched, [first])
    second = make_request("b", shared + [7, 8, 9], 3)
    fed = []
    run_to_completion(sched, [second], on_step=lambda out: fed.extend(n for _, n in out.scheduled))
    assert second.num_cached_tokens == 40
    assert fed[0] == 3  # only the suffix was computed
    assert second.output_token_ids == expected_output(shared + [7, 8, 9], 3)
    assert sched.kv.prefix_cache_hits >= 40


def test_salt_isolates_prefixes():
    sched = build(100, budget=256)
    prompt = list(range(50))
    run_to_completion(sched, [make_request("a", prompt, 1, salt="tenant-a")])
    other = make_request("b", prompt, 1, salt="tenant-b")
    same = make_request("c", prompt, 1, salt="tenant-a")
    run_to_completion(sched, [other])
    run_to_completion(sched, [same])
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 48


def test_last_prompt_token_always_recomputed():
    sched = build(100, budget=256, block_size=4)
    prompt = list(range(16))  # exactly 4 blocks
    run_to_completion(sched, [make_request("a", prompt, 1)])
    again = make_request("b", prompt, 1)
    run_to_completion(sched, [again])
    assert again.num_cached_tokens == 12


def test_eviction_never_touches_blocks_in_use():
    sched = build(12, budget=64, block_size=4)
    # fill the cache with freed-but-cached blocks, then run requests that need all of it
    run_to_completion(sched, [make_request("warm", list(range(40)), 1)])
    work = random_workload(3, n=6)
    outputs, _ = run_to_completion(sched, [make_request(r, p[:30], min(m, 10)) for r, p, m in work])
    for rid, prompt, max_tokens in work:
        assert outputs[rid] == expected_output(prompt[:30], min(max_tokens, 10))


def test_abort_returns_all_blocks():
    sched = build(50, budget=16)
    reqs = [make_request(f"r{i}", list(range(20 + i)), 30) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(5):
        out = sched.schedule()
        sched.advance(out)
        for req, _ in out.scheduled:
            if req.num_computed_tokens == req.num_tokens:
                req.append_output_token(1)
    for r in reqs:
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    sched.kv.check_integrity()
    assert sched.kv.num_free_blocks == 50
    assert not sched.has_unfinished()


def test_priority_policy_admits_and_preempts_by_priority():
    sched = build(1000, budget=1000, max_seqs=1, policy="priority")
    low = make_request("low", [1, 2, 3], 1, priority=5, arrival=1.0)
    high = make_request("high", [4, 5, 6], 1, priority=-1, arrival=2.0)
    sched.add_request(low)
    sched.add_request(high)
    out = sched.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["high"]


def test_fair_policy_light_tenant_not_starved():
    sched = build(1000, budget=32, max_seqs=2, policy="fair")
    heavy = [make_request(f"h{i}", list(range(16)), 4, tenant="heavy", arrival=float(i)) for i in range(20)]
    light = make_request("light", list(range(16)), 4, tenant="light", arrival=100.0)
    order = []
    for r in heavy + [light]:
        sched.add_request(r)
    while sched.has_unfinished():
        out = sched.schedule()
        sched.advance(out)
        for req, _ in out.scheduled:
            if req.num_computed_tokens == req.num_tokens:
                req.append_output_token(1)
                if req.num_output_tokens >= req.max_tokens:
                    sched.finish_request(req, RequestStatus.FINISHED_LENGTH)
                    order.append(req.request_id)
    assert order.index("light") < 5  # served among the first, despite arriving last


def test_sjf_prefers_short_requests():
    sched = build(1000, budget=10_000, max_seqs=1, policy="sjf")
    now = time.time()
    sched.add_request(make_request("long", list(range(500)), 100, arrival=now))
    sched.add_request(make_request("short", list(range(5)), 2, arrival=now))
    out = sched.schedule()
    assert [r.request_id for r, _ in out.scheduled] == ["short"]


def test_static_batching_waits_for_batch_to_finish():
    kv = KVCacheManager(1000, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=1000, max_num_seqs=2, static_batching=True)
    sched = Scheduler(cfg, kv, make_policy("fcfs"))
    reqs = [make_request("a", [1, 2], 1), make_request("b", [3, 4], 5), make_request("c", [5, 6], 1)]
    outputs, steps = run_to_completion(sched, reqs)
    first_c = next(i for i, s in enumerate(steps) if any(r.request_id == "c" for r, _ in s.scheduled))
    last_b = max(i for i, s in enumerate(steps) if any(r.request_id == "b" for r, _ in s.scheduled))
    assert first_c > last_b


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_policy("nope")


def test_static_batch_fills_to_max_num_seqs_across_steps():
    kv = KVCacheManager(1000, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=3, static_batching=True)
    sched = Scheduler(cfg, kv, make_policy("fcfs"))
    reqs = [make_request(f"r{i}", list(range(6)), 4) for i in range(5)]
    _, steps = run_to_completion(sched, reqs)
    first_step = {r.request_id: i for i, s in reversed(list(enumerate(steps))) for r, _ in s.scheduled}
    last_step = {r.request_id: i for i, s in enumerate(steps) for r, _ in s.scheduled}
    # r0..r2 form one batch (admitted over several steps: 6-token prompts, 8-token budget);
    # r3 starts only after the whole first batch has finished
    assert max(first_step[f"r{i}"] for i in range(3)) < min(last_step[f"r{i}"] for i in range(3))
    assert first_step["r3"] > max(last_step[f"r{i}"] for i in range(3))


def test_sjf_aging_lets_old_long_request_win_eventually():
    policy = make_policy("sjf")
    old_long = make_request("long", list(range(500)), 100, arrival=0.0)
    new_short = make_request("short", list(range(5)), 2, arrival=1.0)  # 1 s of aging < 593 tokens
    assert policy.admission_key(new_short, 1.0) < policy.admission_key(old_long, 1.0)
    late_short = make_request("late", list(range(5)), 2, arrival=1000.0)
    assert policy.admission_key(old_long, 1000.0) < policy.admission_key(late_short, 1000.0)
