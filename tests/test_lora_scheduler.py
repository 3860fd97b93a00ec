"""The scheduler's LoRA rule without a model (tests/test_scheduler.py's fake model): never more
distinct adapters in a step than ``max_loras``, under every policy, static batching and
preemption, with every request's output unchanged. The engine-level tests (peft reference,
starvation under a stream of another adapter) are in tests/test_lora.py."""
from __future__ import annotations

import random

import pytest

from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.policies import make_policy
from engine.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler import expected_output, run_to_completion


@pytest.mark.parametrize("policy", ["fcfs", "priority", "sjf", "fair", "static"])
def test_scheduler_max_loras_fuzz(policy):
    """The scheduler alone (fake model, every policy, preemption): no step ever runs more distinct
    adapters than max_loras, each step's adapters are the ones its sequences carry, and every
    request finishes with the output it would get alone."""
    rng = random.Random(policy)
    config = SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=6, max_model_len=512, max_loras=2,
                             static_batching=policy == "static")
    sched = Scheduler(config, KVCacheManager(12, 8), make_policy("fcfs" if policy == "static" else policy))
    requests = []
    for i in range(40):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
        max_tokens = rng.randrange(1, 12)
        lora = rng.choice([None, 1, 2, 3, 4])
        requests.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), max_tokens, float(i),
                                rng.randrange(3), tenant=f"t{i % 3}", lora_name=lora and f"a{lora}", lora_id=lora))
    expected = {r.request_id: expected_output(r.prompt_token_ids, r.max_tokens) for r in requests}
    by_id = {r.request_id: r for r in requests}

    def on_step(out):
        adapters = {s.lora_id for s in out.scheduled if s.lora_id is not None}
        assert len(adapters) <= 2
        assert all(s.lora_id == by_id[s.request_id].lora_id for s in out.scheduled)

    outputs, steps = run_to_completion(sched, requests, on_step=on_step)
    assert outputs == expected
    assert sched.num_preemptions > 0
    assert any(len({s.lora_id for s in o.scheduled} - {None}) == 2 for o in steps)  # the slots were shared
