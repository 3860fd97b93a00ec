"""Prefix caching through the real engine: shared prefixes are not recomputed, outputs do not
change, block accounting holds after every step."""
import random

import pytest

from engine import LLM, SamplingParams
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama")


def run(engine, prompts, params):
    """Runs prompts to completion; returns (outputs by id, tokens fed to the model)."""
    for i, p in enumerate(prompts):
        engine.add_request(f"q{engine.stats.num_steps}-{i}", p, params)
    fed, final = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        fed += engine.stats.last_batch_tokens
        engine.check_integrity()
    return [final[k] for k in sorted(final, key=lambda k: int(k.rsplit("-", 1)[1]))], fed


def test_shared_200_token_prefix_computes_only_suffix(path):
    rng = random.Random(0)
    prefix = [rng.randrange(3, 49152) for _ in range(200)]
    first = prefix + [rng.randrange(3, 49152) for _ in range(9)]
    second = prefix + [rng.randrange(3, 49152) for _ in range(13)]
    params = SamplingParams(temperature=0, max_tokens=1)
    llm = LLM(path, dtype="float32", num_blocks=64)
    (out1,), fed1 = run(llm.engine, [first], params)
    (out2,), fed2 = run(llm.engine, [second], params)
    assert fed1 == len(first)
    assert out2.num_cached_tokens == 192  # 12 full blocks of 16 out of the 200 shared tokens
    assert fed2 == len(second) - 192
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits == 192 and stats.prefix_cache_queries == len(first) + len(second)

    fresh = LLM(path, dtype="float32", num_blocks=64, enable_prefix_caching=False)
    (ref2,), fed_ref = run(fresh.engine, [second], params)
    assert fed_ref == len(second)
    assert ref2.outputs[0].token_ids == out2.outputs[0].token_ids


def test_generated_tokens_become_cacheable_for_next_turn(path):
    rng = random.Random(1)
    prompt = [rng.randrange(3, 49152) for _ in range(20)]
    llm = LLM(path, dtype="float32", num_blocks=64)
    (turn1,), _ = run(llm.engine, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    history = prompt + turn1.outputs[0].token_ids  # 50 tokens: 3 full blocks
    (turn2,), fed = run(llm.engine, [history + [7, 8, 9]], SamplingParams(temperature=0, max_tokens=1))
    assert turn2.num_cached_tokens == 48
    assert fed == 53 - 48


def test_eviction_under_pressure_keeps_outputs_correct(path):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(20, 60))] for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    tight = LLM(path, dtype="float32", num_blocks=10, max_num_batched_tokens=32)
    roomy = LLM(path, dtype="float32", num_blocks=256, enable_prefix_caching=False)
    got, _ = run(tight.engine, prompts + prompts[:3], params)  # repeats hit (or were evicted)
    want = roomy.generate(prompts + prompts[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert tight.engine.kv.num_free_blocks == 10
