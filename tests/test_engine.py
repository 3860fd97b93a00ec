"""End-to-end engine tests against transformers: greedy tokens identical, logprobs close, under
normal settings, forced preemption and forced chunked prefill."""
import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.checkpoints import ARCHS, load_reference, make_tiny_checkpoint

MAX_NEW = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: make_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch) for arch in ARCHS}


def random_prompts(n=8, seed=0, vocab=49152):
    rng = random.Random(seed)
    lengths = [1, 5, 16, 17, 33, 48, 70, 9][:n]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


def hf_greedy(path, prompts, max_new=MAX_NEW):
    """Reference tokens and per-step logprobs of the chosen tokens, one prompt at a time."""
    model = load_reference(path)
    results = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
        tokens = g.sequences[0, len(p):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(g.logits, tokens)]
        results.append((tokens, logprobs))
    return results


def check_against_hf(llm, path, prompts, ref=None):
    # min_tokens masks EOS like min_new_tokens does in the reference
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, logprobs=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    ref = ref or hf_greedy(path, prompts)
    for out, (tokens, logprobs) in zip(outs, ref):
        got = out.outputs[0]
        assert got.token_ids == tokens
        ours = [lp[t] for lp, t in zip(got.logprobs, got.token_ids)]
        assert ours == pytest.approx(logprobs, abs=2e-3)
        assert got.finish_reason == "length"
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(checkpoints, arch):
    path = checkpoints[arch]
    prompts = random_prompts()
    llm = LLM(path, dtype="float32", num_blocks=256, attention_backend="torch")
    check_against_hf(llm, path, prompts)
    llm.engine.check_integrity()
    assert llm.engine.kv.num_free_blocks == 256


def test_preemption_and_chunked_prefill_do_not_change_output(checkpoints):
    path = checkpoints["llama"]
    prompts = random_prompts()
    ref = hf_greedy(path, prompts)
    # 8 blocks of 16 tokens can hold ~1.5 of these sequences at once: constant preemption.
    llm = LLM(path, dtype="float32", num_blocks=8, max_num_batched_tokens=24, attention_backend="torch",
              enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    final = {}
    max_chunk = 0
    while engine.has_unfinished_requests():
        sched_peek = engine.scheduler
        outs = engine.step()
        engine.check_integrity()
        max_chunk = max(max_chunk, engine.stats.last_batch_tokens)
        for o in outs:
            if o.finished:
                final[o.request_id] = o
    del sched_peek
    assert engine.scheduler.num_preemptions > 0
    assert max_chunk <= 24
    for i, (tokens, _) in enumerate(ref):
        assert final[str(i)].outputs[0].token_ids == tokens
    assert engine.kv.num_free_blocks == 8


def test_prefix_caching_on_and_off_identical(checkpoints):
    path = checkpoints["qwen2"]
    rng = random.Random(5)
    shared = [rng.randrange(3, 49152) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 49152) for _ in range(k)] for k in (1, 7, 20)]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    results = []
    for caching in (True, False):
        llm = LLM(path, dtype="float32", num_blocks=64, enable_prefix_caching=caching)
        first = llm.generate(prompts[:1], params, use_tqdm=False)  # warm the cache
        rest = llm.generate(prompts[1:], params, use_tqdm=False)
        results.append([o.outputs[0].token_ids for o in first + rest])
        if caching:
            assert rest[0].num_cached_tokens == 32
    assert results[0] == results[1]


def test_seeded_sampling_independent_of_batch(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(path, dtype="float32", num_blocks=128)
    prompt = random_prompts()[3]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts(seed=9)
    crowd_params = [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)] * 3 + [seeded]
    crowd = llm.generate(others[:3] + [prompt], crowd_params, use_tqdm=False)
    assert crowd[3].outputs[0].token_ids == alone
    again = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_stop_strings_and_stop_tokens(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(path, dtype="float32", num_blocks=128)
    prompt = random_prompts()[4]
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    full = base[0].outputs[0]
    assert len(full.text) > 4
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    stop_tok = full.token_ids[3]
    by_tok = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                   stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert by_tok.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    assert by_tok.stop_reason == stop_tok


def test_n_logprobs_and_abort(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(path, dtype="float32", num_blocks=64)
    out = llm.generate([random_prompts()[2]], SamplingParams(n=3, temperature=1.0, max_tokens=5, logprobs=3,
                                                              seed=7, ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert len(o.logprobs) == 5
        for lp, t in zip(o.logprobs, o.token_ids):
            assert t in lp and 3 <= len(lp) <= 4 and all(v <= 0 for v in lp.values())
    engine = llm.engine
    engine.add_request("x", random_prompts()[6], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.num_free_blocks < 64
    engine.abort_request("x")
    engine.check_integrity()
    assert engine.kv.num_free_blocks == 64
    outs = engine.step()
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_bad_requests_are_clear_errors(checkpoints):
    llm = LLM(checkpoints["llama"], dtype="float32", num_blocks=64, max_model_len=128)
    with pytest.raises(ValueError, match="maximum context length is 128"):
        llm.generate([[5] * 100], SamplingParams(max_tokens=50), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]], SamplingParams(max_tokens=5), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**9]], SamplingParams(max_tokens=5), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def _fail_runner_once(engine, when):
    """Makes the runner raise on the first step for which ``when(scheduler_output)`` holds."""
    real = engine.runner.execute
    state = {"failed": 0}

    def execute(out):
        if not state["failed"] and when(out):
            state["failed"] += 1
            raise IndexError("simulated failure inside the step")
        return real(out)

    engine.runner.execute = execute
    return state


def test_failed_step_fails_only_its_requests_and_engine_keeps_serving(checkpoints):
    from engine.step_failure import EngineFatalError

    path = checkpoints["llama"]
    prompts = random_prompts()
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW)
    ref = LLM(path, dtype="float32", num_blocks=64).generate(prompts, params, use_tqdm=False)
    llm = LLM(path, dtype="float32", num_blocks=64, max_num_seqs=2)
    engine = llm.engine
    # two seats: requests 0 and 1 run first; the step after their prefill fails
    state = _fail_runner_once(engine, lambda out: all(not s.sample or s.output_token_ids for s in out.scheduled)
                              and any(s.output_token_ids for s in out.scheduled))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        engine.check_integrity()
    assert state["failed"] == 1
    victims = sorted(k for k, o in final.items() if o.error is not None)
    assert victims == ["0", "1"]
    for k in victims:
        assert final[k].outputs[0].finish_reason == "error" and "IndexError" in final[k].error
    for i in range(2, len(prompts)):  # queued behind the failure: untouched
        assert final[str(i)].error is None
        assert final[str(i)].outputs[0].token_ids == ref[i].outputs[0].token_ids
    assert engine.kv.num_free_blocks == 64
    # the victims' prompts are served correctly afterwards (no half-written block was cached)
    again = llm.generate(prompts[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in ref[:2]]

    # a device error is fatal at once; repeated failures are fatal too
    engine.runner.execute = lambda out: (_ for _ in ()).throw(RuntimeError("CUDA error: device-side assert"))
    engine.add_request("fatal", prompts[0], params)
    with pytest.raises(EngineFatalError):
        engine.step()
    engine.abort_request("fatal")
    engine.step()
    engine.runner.execute = lambda out: (_ for _ in ()).throw(ValueError("boom"))
    outcomes = []
    with pytest.raises(EngineFatalError, match="in a row"):
        for i in range(5):
            engine.add_request(f"r{i}", prompts[1], params)
            outcomes += [o.outputs[0].finish_reason for o in engine.step()]
    assert outcomes == ["error", "error"]


def test_failure_while_building_outputs_keeps_outputs_already_made(checkpoints):
    llm = LLM(checkpoints["llama"], dtype="float32", num_blocks=64)
    engine = llm.engine
    engine.add_request("done", random_prompts()[1], SamplingParams(temperature=0, max_tokens=1))
    engine.add_request("breaks", random_prompts()[2], SamplingParams(temperature=0, max_tokens=5))

    def broken(token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated detokenizer failure")

    engine.outputs._seq_of["breaks"][1].detok.add_token = broken
    outs = {o.request_id: o for o in engine.step()}  # both prefill in this step; "done" ends in it
    assert outs["done"].finished and outs["done"].error is None
    assert outs["done"].outputs[0].finish_reason == "length" and len(outs["done"].outputs[0].token_ids) == 1
    assert outs["breaks"].finished and outs["breaks"].outputs[0].finish_reason == "error"
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == 64
    engine.check_integrity()


def test_prefill_chunks_are_recorded_per_request(checkpoints):
    """Under chunked prefill each step that feeds a prompt is one entry of the request's
    metrics (tracing shows them as events); the entries add up to the prompt."""
    llm = LLM(checkpoints["llama"], dtype="float32", num_blocks=64, max_num_batched_tokens=16,
              attention_backend="torch", enable_prefix_caching=False)
    prompts = random_prompts()[5:7]  # 48 and 70 tokens
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        chunks = out.metrics.prefill_chunks
        assert len(chunks) >= len(prompt) // 16 and sum(n for _, n in chunks) == len(prompt)
        assert [t for t, _ in chunks] == sorted(t for t, _ in chunks)
        assert out.metrics.first_token_time >= chunks[-1][0]
