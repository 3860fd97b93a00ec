"""Scheduler and KV cache manager without a model: a fake "model" appends a token that is a
deterministic function of the sequence so far, which lets us check that preemption, chunking and
prefix caching never change what a request sees. The fake runs the same two calls as the engine
(`schedule`, `update_from_output`) and reads only the `SchedulerOutput`."""
import subprocess
import sys
import random
import time

import pytest

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.output import SampledTokens
from engine.scheduler.policies import make_policy
from engine.scheduler.scheduler import Scheduler, SchedulerConfig


def fake_next_token(tokens: list[int]) -> int:
    return (sum(tokens[-3:]) * 31 + len(tokens)) % 1000


def make_request(rid, prompt, max_tokens, priority=0, salt=None, tenant=None, arrival=None):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens,
                   time.time() if arrival is None else arrival, priority, salt, tenant)


def fake_step(sched: Scheduler, token_fn=None):
    """One engine step with the fake model: schedule, "run" it from the SchedulerOutput alone,
    update. Returns (the SchedulerOutput, the finished requests)."""
    out = sched.schedule()
    sampled = SampledTokens()
    for s in out.scheduled:
        if s.sample:  # the sequence so far = prompt + outputs; the fed tokens end it
            history = s.prompt_token_ids + s.output_token_ids
            assert history[s.num_computed_tokens:] == s.token_ids
            sampled.request_ids.append(s.request_id)
            sampled.token_ids.append(token_fn(history) if token_fn else fake_next_token(history))
    return out, sched.update_from_output(out, sampled)


def run_to_completion(sched: Scheduler, requests, max_steps=10_000, on_step=None):
    """Runs the fake model; returns {request_id: output tokens} and the per-step outputs."""
    for r in requests:
        sched.add_request(r)
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out, _ = fake_step(sched)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        for s in out.scheduled:
            assert len(s.block_ids) * sched.kv.block_size >= s.num_computed_tokens + s.num_new_tokens
        steps.append(out)
        sched.check_integrity()
        if on_step:
            on_step(out)
    assert not sched.has_unfinished()
    sched.check_idle()
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
    chunk_sizes = [s.num_new_tokens for out in steps for s in out.scheduled]
    assert chunk_sizes[:4] == [8, 8, 8, 6]


def test_prefix_cache_reuses_shared_blocks_and_counts_hits():
    sched = build(100, budget=256, block_size=4)
    shared = list(range(100, 140))  # 40 tokens = 10 full blocks
    first = make_request("a", shared + [1, 2], 3)
    run_to_completion(sched, [first])
    second = make_request("b", shared + [7, 8, 9], 3)
    fed = []
    run_to_completion(sched, [second], on_step=lambda out: fed.extend(s.num_new_tokens for s in out.scheduled))
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
        fake_step(sched, token_fn=lambda _: 1)
    for r in reqs:
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    sched.check_integrity()
    sched.check_idle()
    assert sched.kv.num_free_blocks == 50
    assert not sched.has_unfinished()


def test_priority_policy_admits_and_preempts_by_priority():
    sched = build(1000, budget=1000, max_seqs=1, policy="priority")
    low = make_request("low", [1, 2, 3], 1, priority=5, arrival=1.0)
    high = make_request("high", [4, 5, 6], 1, priority=-1, arrival=2.0)
    sched.add_request(low)
    sched.add_request(high)
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["high"]


def test_fair_policy_light_tenant_not_starved():
    sched = build(1000, budget=32, max_seqs=2, policy="fair")
    heavy = [make_request(f"h{i}", list(range(16)), 4, tenant="heavy", arrival=float(i)) for i in range(20)]
    light = make_request("light", list(range(16)), 4, tenant="light", arrival=100.0)
    order = []
    for r in heavy + [light]:
        sched.add_request(r)
    while sched.has_unfinished():
        _, finished = fake_step(sched, token_fn=lambda _: 1)
        order.extend(r.request_id for r in finished)
    assert order.index("light") < 5  # served among the first, despite arriving last


def test_sjf_prefers_short_requests():
    sched = build(1000, budget=10_000, max_seqs=1, policy="sjf")
    now = time.time()
    sched.add_request(make_request("long", list(range(500)), 100, arrival=now))
    sched.add_request(make_request("short", list(range(5)), 2, arrival=now))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["short"]


def test_static_batching_waits_for_batch_to_finish():
    kv = KVCacheManager(1000, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=1000, max_num_seqs=2, static_batching=True)
    sched = Scheduler(cfg, kv, make_policy("fcfs"))
    reqs = [make_request("a", [1, 2], 1), make_request("b", [3, 4], 5), make_request("c", [5, 6], 1)]
    outputs, steps = run_to_completion(sched, reqs)
    first_c = next(i for i, out in enumerate(steps) if any(s.request_id == "c" for s in out.scheduled))
    last_b = max(i for i, out in enumerate(steps) if any(s.request_id == "b" for s in out.scheduled))
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
    first_step = {s.request_id: i for i, out in reversed(list(enumerate(steps))) for s in out.scheduled}
    last_step = {s.request_id: i for i, out in enumerate(steps) for s in out.scheduled}
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


def test_update_from_output_stops_on_eos_stop_ids_and_limits():
    kv = KVCacheManager(100, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=12, eos_token_ids=frozenset({2}))
    sched = Scheduler(cfg, kv, make_policy("fcfs"))

    def req(rid, **kw):
        params = SamplingParams(max_tokens=kw.pop("max_tokens", 5), **kw)
        return Request(rid, [10, 11, 12], params, params.max_tokens, 0.0)

    eos = req("eos")
    early_eos = req("early-eos", min_tokens=2)  # eos masked out until 2 tokens
    ignore = req("ignore", ignore_eos=True)
    stop_id = req("stop-id", stop_token_ids=[2, 7])
    length = req("length", max_tokens=2)
    context = req("context", max_tokens=9)  # 3 + 9 > max_model_len 12: ends at 12 tokens
    logprobs = req("logprobs", logprobs=1)
    for r in (eos, early_eos, ignore, stop_id, length, context, logprobs):
        sched.add_request(r)
    tokens = {"eos": [2], "early-eos": [2, 2], "ignore": [2] * 5, "stop-id": [5, 7],
              "length": [5, 5], "context": [5] * 9, "logprobs": [4] * 5}
    status = {}
    while sched.has_unfinished():
        out = sched.schedule()
        sampled = SampledTokens(logprobs=[], chosen_logprobs=[])
        for s in out.scheduled:
            if s.sample:
                sampled.request_ids.append(s.request_id)
                sampled.token_ids.append(tokens[s.request_id][len(s.output_token_ids)])
                sampled.logprobs.append({4: -0.5})
                sampled.chosen_logprobs.append(-0.5)
        for r in sched.update_from_output(out, sampled):
            status[r.request_id] = (r.status, r.stop_reason, len(r.output_token_ids))
        sched.check_integrity()
    S = RequestStatus
    assert status == {"eos": (S.FINISHED_STOPPED, None, 1), "early-eos": (S.FINISHED_STOPPED, None, 2),
                      "ignore": (S.FINISHED_LENGTH, None, 5), "stop-id": (S.FINISHED_STOPPED, 7, 2),
                      "length": (S.FINISHED_LENGTH, None, 2), "context": (S.FINISHED_LENGTH, None, 9),
                      "logprobs": (S.FINISHED_LENGTH, None, 5)}
    assert logprobs.logprobs == [{4: -0.5}] * 5 and logprobs.cumulative_logprob == -2.5
    assert eos.logprobs == []  # not asked for
    sched.check_idle()


def test_failed_step_frees_blocks_and_drops_unwritten_cache_entries():
    sched = build(100, budget=64, block_size=4)
    prompt = list(range(100, 120))  # 5 full blocks
    first = make_request("a", prompt, 3)
    sched.add_request(first)
    out = sched.schedule()  # the whole prompt is scheduled; its full blocks are registered now
    failed = sched.fail_step(out)  # ... but the step that should have written them failed
    assert failed == [first] and first.status == RequestStatus.FINISHED_ERROR
    sched.check_integrity()
    sched.check_idle()
    again = make_request("b", prompt, 3)
    run_to_completion(sched, [again])
    assert again.num_cached_tokens == 0  # nothing unwritten was found in the prefix cache
    third = make_request("c", prompt, 3)
    run_to_completion(sched, [third])
    assert third.num_cached_tokens == 16  # written blocks are cached as usual


def test_failed_decode_step_keeps_blocks_written_by_earlier_steps():
    sched = build(100, budget=64, block_size=4)
    prompt = list(range(100, 118))  # 4 full blocks + 2 tokens
    req = make_request("a", prompt, 10)
    sched.add_request(req)
    fake_step(sched)  # prefill succeeds: 4 full blocks written and cached
    fake_step(sched)
    out = sched.schedule()  # the decode that fills block 5 (positions 16..19)
    sched.fail_step(out)
    sched.check_idle()
    probe = make_request("b", req.all_token_ids + [1, 2, 3, 4], 1)
    run_to_completion(sched, [probe])
    assert probe.num_cached_tokens == 16


def test_every_builtin_policy_name_and_import_path_resolves():
    from engine.scheduler.policies import BUILTIN_POLICIES, SchedulingPolicy

    assert sorted(BUILTIN_POLICIES) == ["fair", "fcfs", "priority", "sjf", "slo"]
    for name, cls in BUILTIN_POLICIES.items():
        policy = make_policy(name)
        assert type(policy) is cls and policy.name == name
        assert type(make_policy(f"{cls.__module__}:{cls.__name__}")) is cls
    with pytest.raises(TypeError):
        SchedulingPolicy()  # the interface is abstract: FCFS is a policy of its own
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_policy(SchedulingPolicy)
    with pytest.raises(ValueError, match="could not be imported"):
        make_policy("engine.scheduler.policies:Nope")


@pytest.mark.parametrize("module,forbidden", [
    ("engine.kv_cache.kv_cache_manager", "engine.scheduler"),
    ("engine.scheduler.scheduler", "engine.kv_cache"),
    ("engine.scheduler.policies", "engine.kv_cache"),
    ("engine.request", "engine.scheduler"),
    ("engine.request", "engine.kv_cache"),
])
def test_kv_cache_and_scheduler_do_not_import_each_other(module, forbidden):
    # a fresh interpreter, so sys.modules holds only what `module` pulls in
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m == {forbidden!r} "
            f"or m.startswith({forbidden!r} + '.')); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing {module} imports {done.stdout.strip()} {done.stderr[-500:]}"


def test_static_batch_is_not_blocked_by_a_newcomer_that_outranks_it():
    # The batch {a, b} is fixed when a is admitted; c (higher priority) arrives before b gets a
    # seat. b must still run with its batch, and c only after the batch is done.
    kv = KVCacheManager(1000, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=2, static_batching=True)
    sched = Scheduler(cfg, kv, make_policy("priority"))
    a, b = make_request("a", list(range(6)), 2, priority=1), make_request("b", list(range(6)), 2, priority=1)
    sched.add_request(a)
    sched.add_request(b)
    first, _ = fake_step(sched)
    assert [s.request_id for s in first.scheduled] == ["a"]
    c = make_request("c", list(range(6)), 2, priority=0)
    _, steps = run_to_completion(sched, [c])
    last_b = max(i for i, out in enumerate(steps) if any(s.request_id == "b" for s in out.scheduled))
    first_c = min(i for i, out in enumerate(steps) if any(s.request_id == "c" for s in out.scheduled))
    assert first_c > last_b
