"""Multi-LoRA serving (engine/lora/) against peft: three random adapters of different ranks and
target modules, made with peft on a tiny random checkpoint, served in one mixed batch with
base-model requests; greedy tokens must equal peft's model with that adapter (and the merged
model), logprobs close (fp32). Also: unload + reload, max_loras=1 with three adapters queued,
the prefix cache across adapters, and the adapters the engine must refuse. The scheduler's
max_loras rule alone, fuzzed under every policy: tests/test_lora_scheduler.py."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.lora import LoRAError, LoRARequest
from tests.checkpoints import load_reference, make_tiny_checkpoint

MAX_NEW = 8
# (name, rank, alpha, Llama-family targets, GPT-2 targets, rsLoRA)
ADAPTERS = (
    ("sql", 8, 16, ["q_proj", "v_proj"], ["c_attn"], False),
    ("chat", 4, 8, ["k_proj", "o_proj", "gate_proj", "down_proj"], ["c_proj"], False),
    ("code", 16, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
     ["c_attn", "c_proj", "c_fc"], True),
)
ARCHS = ("llama", "qwen3", "gpt2")  # Llama with GQA; Qwen3 (head_dim != hidden / heads, q/k norm); GPT-2


def make_adapter(base: str, out: str, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int) -> str:
    """A random PEFT adapter: lora_B randomized too (peft starts it at zero, a no-op adapter)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    model = get_peft_model(load_reference(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    base = make_tiny_checkpoint(str(root / "base"), arch)
    loras = []
    for i, (name, rank, alpha, targets, gpt2_targets, rslora) in enumerate(ADAPTERS):
        path = make_adapter(base, str(root / name), rank, alpha, gpt2_targets if arch == "gpt2" else targets,
                            rslora, seed=10 + i)
        loras.append(LoRARequest(name, i + 1, path))
    return arch, base, loras


def prompts(n: int, seed: int, lengths=(5, 19, 33, 12)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(length)] for length in lengths[:n]]


def reference(base: str, lora: LoRARequest | None, prompt_list, merged: bool = False):
    """peft's greedy tokens and chosen-token logprobs (or the base model's, or the merged model's)."""
    from peft import PeftModel

    model = load_reference(base)
    if lora is not None:
        model = PeftModel.from_pretrained(model, lora.lora_path).eval()
        if merged:
            model = model.merge_and_unload()
    results = []
    for p in prompt_list:
        ids = torch.tensor([p])
        with torch.inference_mode():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                               min_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
        tokens = g.sequences[0, len(p):].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, tokens)]
        results.append((tokens, logprobs))
    return results


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, logprobs=1)


def check(outs, refs):
    for out, (tokens, logprobs) in zip(outs, refs):
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert [lp[t] for lp, t in zip(got.logprobs, got.token_ids)] == pytest.approx(logprobs, abs=2e-3)


def record_steps(llm) -> list[list]:
    """Records the adapter uid of every sequence of every step the runner runs."""
    steps, manager = [], llm.engine.lora
    original = manager.set_step

    def set_step(sequences):
        steps.append([uid for uid, _ in sequences])
        original(sequences)

    manager.set_step = set_step
    return steps


def test_mixed_batch_matches_peft_and_merged(setup):
    arch, base, loras = setup
    llm = LLM(base, dtype="float32", num_blocks=128, enable_lora=True, max_loras=3, max_lora_rank=16)
    ps = prompts(2, seed=1)
    # one batch: every adapter and the base model, interleaved
    plan = [(p, lora) for p in ps for lora in [None, *loras]]
    steps = record_steps(llm)
    outs = llm.generate([p for p, _ in plan], PARAMS, use_tqdm=False, lora_request=[lr for _, lr in plan])
    assert steps[0] == [None, 1, 2, 3] * 2  # all 8 sequences, 3 adapters and the base model, in one step
    assert llm.engine.lora.slots.num_loads == 3
    assert [o.lora_name for o in outs] == [lr and lr.lora_name for _, lr in plan]
    for lora in [None, *loras]:
        mine = [o for o, (_, lr) in zip(outs, plan) if lr is lora]
        check(mine, reference(base, lora, ps))
    # the adapters change the output (else the comparison above proves little)
    by_adapter = {lr and lr.lora_name: o.outputs[0].token_ids for o, (p, lr) in zip(outs, plan) if p is ps[1]}
    assert len({tuple(t) for t in by_adapter.values()}) == 4
    # merged model: same greedy tokens
    for lora in loras:
        mine = [o for o, (_, lr) in zip(outs, plan) if lr is lora]
        merged = reference(base, lora, ps, merged=True)
        assert [list(o.outputs[0].token_ids) for o in mine] == [t for t, _ in merged]


def test_unload_reload_and_one_slot(setup):
    arch, base, loras = setup
    llm = LLM(base, dtype="float32", num_blocks=128, enable_lora=True, max_loras=1, max_lora_rank=16,
              max_num_seqs=4)
    ps = prompts(2, seed=2)
    first = llm.generate(ps, PARAMS, use_tqdm=False, lora_request=loras[0])
    assert llm.engine.remove_lora(loras[0].lora_name)
    assert not llm.engine.remove_lora(loras[0].lora_name)
    assert loras[0].lora_name not in [lr.lora_name for lr in llm.engine.list_loras()]
    with pytest.raises(LoRAError) as e:  # unloaded: a request naming it is refused
        llm.engine.add_request("x", ps[0], PARAMS, lora_request=loras[0])
    assert e.value.param == "model"
    again = llm.generate(ps, PARAMS, use_tqdm=False, lora_request=loras[0])  # loads it again
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    # max_loras=1, three adapters' requests queued at once, interleaved: every one completes right
    plan = [(p, lora) for lora in loras for p in ps]
    random.Random(0).shuffle(plan)
    seen = []
    llm.engine.add_lora(loras[1]), llm.engine.add_lora(loras[2])
    for i, (p, lora) in enumerate(plan):
        llm.engine.add_request(f"q{i}", p, PARAMS, lora_request=lora)
    stats = llm.engine.get_stats()
    assert stats.waiting_lora_adapters == sorted(lr.lora_name for lr in loras) and stats.max_loras == 1
    final = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                final[out.request_id] = out
        seen.append(llm.engine.get_stats().running_lora_adapters)
    assert all(len(names) <= 1 for names in seen)
    assert len({tuple(n) for n in seen if n}) == 3  # each adapter had its turn
    for lora in loras:
        ids = [f"q{i}" for i, (_, lr) in enumerate(plan) if lr is lora]
        check([final[i] for i in ids], reference(base, lora, [p for p, lr in plan if lr is lora]))


def test_prefix_cache_per_adapter(setup):
    arch, base, loras = setup
    llm = LLM(base, dtype="float32", num_blocks=64, enable_lora=True, max_loras=2, max_lora_rank=16)
    prompt = prompts(3, seed=3)[2]  # 33 tokens: two full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate([prompt], params, use_tqdm=False, lora_request=loras[0])[0]
    assert first.num_cached_tokens == 0
    other = llm.generate([prompt], params, use_tqdm=False, lora_request=loras[1])[0]
    assert other.num_cached_tokens == 0  # another adapter: no sharing
    base_out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert base_out.num_cached_tokens == 0  # nor with the base model
    same = llm.generate([prompt], params, use_tqdm=False, lora_request=loras[0])[0]
    assert same.num_cached_tokens == 32  # the same adapter shares both full blocks
    assert same.outputs[0].token_ids == first.outputs[0].token_ids


def test_refused_adapters(setup, tmp_path):
    arch, base, loras = setup
    llm = LLM(base, dtype="float32", num_blocks=16, enable_lora=True, max_loras=1, max_lora_rank=8)

    def refused(request, param):
        with pytest.raises(LoRAError) as e:
            llm.engine.add_lora(request)
        assert e.value.param == param and str(e.value).startswith(param)
        return str(e.value)

    refused(LoRARequest("nope", 9, str(tmp_path / "missing")), "lora_path")
    assert "16" in refused(loras[2], "rank")  # rank 16 > max_lora_rank 8

    def edited(name: str, **changes) -> LoRARequest:
        path = tmp_path / name
        os.makedirs(path)
        for f in os.listdir(loras[0].lora_path):
            with open(os.path.join(loras[0].lora_path, f), "rb") as src, open(path / f, "wb") as dst:
                dst.write(src.read())
        with open(path / "adapter_config.json") as f:
            config = json.load(f)
        config.update(changes)
        with open(path / "adapter_config.json", "w") as f:
            json.dump(config, f)
        return LoRARequest(name, 7, str(path))

    # a projection of another architecture (GPT-2's c_attn on a Llama and the reverse)
    foreign = "q_proj" if arch == "gpt2" else "c_attn"
    assert foreign in refused(edited("t1", target_modules=[foreign]), "target_modules")
    refused(edited("t2", modules_to_save=["lm_head"]), "modules_to_save")
    refused(edited("t3", use_dora=True), "use_dora")
    # an adapter trained on another base model
    other = make_tiny_checkpoint(str(tmp_path / "other"), arch, with_tokenizer=False, vocab_size=1024)
    refused(edited("t4", base_model_name_or_path=other), "base_model_name_or_path")
    # the same name from another path; a request for an adapter never loaded
    llm.engine.add_lora(loras[0])
    refused(LoRARequest(loras[0].lora_name, 1, loras[1].lora_path), "lora_name")
    with pytest.raises(LoRAError) as e:
        llm.engine.add_request("r", [5, 6], PARAMS, lora_request=loras[1])
    assert e.value.param == "model"
    assert [lr.lora_name for lr in llm.engine.list_loras()] == [loras[0].lora_name]
    # weights in adapter_model.bin instead of safetensors: the same adapter
    from safetensors.torch import load_file

    as_bin = edited("bin")
    os.remove(os.path.join(as_bin.lora_path, "adapter_model.safetensors"))
    torch.save(load_file(os.path.join(loras[0].lora_path, "adapter_model.safetensors")),
               os.path.join(as_bin.lora_path, "adapter_model.bin"))
    outs = llm.generate([[5, 6, 7]] * 2, PARAMS, use_tqdm=False, lora_request=[loras[0], as_bin])
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_no_adapter_starves_under_a_stream_of_another(setup):
    """max_loras=1: a request of adapter B queued behind a never-ending stream of adapter A
    requests still runs (later A requests pass it at most max_num_seqs times)."""
    arch, base, loras = setup
    llm = LLM(base, dtype="float32", num_blocks=128, enable_lora=True, max_loras=1, max_lora_rank=16,
              max_num_seqs=2)
    engine, a, b = llm.engine, loras[0], loras[1]
    engine.add_lora(a), engine.add_lora(b)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("a0", [5, 6, 7], params, lora_request=a)
    engine.step()  # A is running
    engine.add_request("b", [5, 6, 7], params, lora_request=b)
    done, i = set(), 1
    for _ in range(60):
        engine.add_request(f"a{i}", [5, 6, 7 + i], params, lora_request=a)  # A keeps coming
        i += 1
        done |= {o.request_id for o in engine.step() if o.finished}
        if "b" in done:
            break
    assert "b" in done
    assert sum(r.startswith("a") for r in done) >= 2  # and A requests passed it meanwhile
    engine.abort_request([r.request_id for r in list(engine.scheduler.requests.values())])
    while engine.has_unfinished_requests():
        engine.step()


def test_async_engine_lora(setup):
    import asyncio

    from engine import AsyncEngine, EngineConfig

    arch, base, loras = setup
    ps = prompts(1, seed=4)
    engine = AsyncEngine(EngineConfig(model=base, dtype="float32", num_blocks=32, enable_lora=True, max_loras=2))
    assert engine.wait_ready(60)

    async def run():
        await engine.add_lora(loras[1])
        with pytest.raises(LoRAError):
            await engine.add_lora(LoRARequest("bad", 5, "/nonexistent/adapter"))
        assert [lr.lora_name for lr in engine.list_loras()] == [loras[1].lora_name]
        final = None
        async for out in engine.generate(ps[0], PARAMS, "r1", lora_request=loras[1]):
            final = out
        assert final.lora_name == loras[1].lora_name
        assert engine.get_stats().max_loras == 2  # the adapter lists are checked in the one-slot test
        assert await engine.remove_lora(loras[1].lora_name) is True
        assert await engine.remove_lora(loras[1].lora_name) is False
        return final

    try:
        final = asyncio.run(run())
    finally:
        engine.shutdown()
    check([final], reference(base, loras[1], ps))


def test_unload_while_running_and_preempted(setup):
    """A request keeps its adapter when the adapter is unloaded mid-generation (its weights go
    when it ends), and when it is preempted and recomputed."""
    arch, base, loras = setup
    ps = prompts(4, seed=5, lengths=(14, 15, 30, 12))
    # the prompts take 5 blocks of 16, and each needs one more while decoding: with 6 blocks
    # some are preempted and recomputed
    llm = LLM(base, dtype="float32", num_blocks=6, enable_lora=True, max_loras=2, max_lora_rank=16)
    engine = llm.engine
    plan = list(zip(ps, [loras[0], loras[1], loras[0], None]))
    for lora in (loras[0], loras[1]):
        engine.add_lora(lora)
    for i, (p, lora) in enumerate(plan):
        engine.add_request(f"p{i}", p, PARAMS, lora_request=lora)
    engine.step()
    assert engine.remove_lora(loras[1].lora_name)  # p1 is running on it
    assert engine.lora.has_retired
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.get_stats().num_preemptions > 0
    assert not engine.lora.has_retired and engine.lora.slots.slot_of(2) is None  # freed once p1 ended
    for lora in (loras[0], loras[1], None):
        ids = [f"p{i}" for i, (_, lr) in enumerate(plan) if lr is lora]
        check([final[i] for i in ids], reference(base, lora, [p for p, lr in plan if lr is lora]))
