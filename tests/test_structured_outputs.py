"""Structured outputs in the engine, on a tiny random-weight model (without the mask its output
is noise, so every valid output is the mask's doing): random JSON schemas validate, regexes
and choices fullmatch, free requests are untouched by constrained neighbours, preemption and
n > 1 keep each sequence's grammar in step, and bad constraints are refused naming the field."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.errors import InvalidParameterError
from engine.structured_output import StructuredOutputsParams as S
from tests.checkpoints import make_tiny_checkpoint
from tests.structured_schemas import random_schemas


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("so")), "llama")


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, dtype="float32", device="cpu", attention_backend="torch", num_blocks=1024)


def _check_json(text: str, finish_reason: str, schema: dict) -> bool:
    """True when the output is a complete valid instance; a cut-off output (finish_reason
    "length") is exempt. Anything else fails the test."""
    if finish_reason == "length":
        return False
    assert finish_reason == "stop", finish_reason
    jsonschema.validate(json.loads(text), schema)
    return True


def test_random_schemas_greedy_and_sampled_outputs_validate(llm):
    schemas = random_schemas(50, seed=1)
    params = []
    for i, schema in enumerate(schemas):
        params.append(SamplingParams(max_tokens=48, temperature=0, structured_outputs=S(json=schema)))
        params.append(SamplingParams(max_tokens=48, temperature=1.0, seed=i, structured_outputs=S(json=schema)))
    outs = llm.generate([f"Item {i}:" for i in range(len(params))], params, use_tqdm=False)
    complete = sum(_check_json(o.outputs[0].text, o.outputs[0].finish_reason, schemas[i // 2])
                   for i, o in enumerate(outs))
    assert complete >= 0.8 * len(params), f"only {complete} of {len(params)} finished within max_tokens"


def test_json_object_regex_choice_and_grammar(llm):
    regexes = [r"[a-c]{2,4}-\d{3}", r"(yes|no), because [a-z]{1,5}\.", r"\d{1,3}\.\d{2}"]
    choices = ["positive", "negative", "neutral"]
    grammar = 'root ::= "(" expr ")"\nexpr ::= [0-9] | [0-9] "+" expr'
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=k, n=2, structured_outputs=S(regex=r))
              for k, r in enumerate(regexes)]
    params.append(SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=3, structured_outputs=S(choice=choices)))
    params.append(SamplingParams(max_tokens=40, temperature=0, structured_outputs=S(grammar=grammar)))
    params.append(SamplingParams(max_tokens=40, temperature=0.7, seed=5, structured_outputs=S(json_object=True)))
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for r, out in zip(regexes, outs):
        for c in out.outputs:
            assert c.finish_reason == "stop" and re.fullmatch(r, c.text), (r, c.text, c.finish_reason)
    assert all(c.text in choices for c in outs[3].outputs) and len(outs[3].outputs) == 4
    assert re.fullmatch(r"\((\d\+)*\d\)", outs[4].outputs[0].text) or outs[4].outputs[0].finish_reason == "length"
    obj = outs[5].outputs[0]
    assert obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict)


def test_free_requests_get_the_same_tokens_beside_constrained_ones(llm):
    free = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=0.9, seed=7)]
    prompts = ["The weather today", "Once upon"]
    alone = llm.generate(prompts, free, use_tqdm=False)
    constrained = SamplingParams(max_tokens=12, temperature=0, structured_outputs=S(regex=r"[xyz]{5,}"))
    mixed = llm.generate(["a", prompts[0], "b", prompts[1]], [constrained, free[0], constrained, free[1]],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[1].outputs[0].token_ids, mixed[3].outputs[0].token_ids]
    assert re.fullmatch(r"[xyz]{5,}", mixed[0].outputs[0].text)


def test_preemption_mid_constrained_output_still_valid(tiny):
    small = LLM(tiny, dtype="float32", device="cpu", attention_backend="torch", num_blocks=14, block_size=4,
                enable_prefix_caching=False)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999},
              "minItems": 5, "maxItems": 5}
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i, structured_outputs=S(json=schema))
              for i in range(4)]
    outs = small.generate(["List numbers:"] * 4, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for o in outs:
        assert _check_json(o.outputs[0].text, o.outputs[0].finish_reason, schema), o.outputs[0]


def test_stop_strings_and_max_tokens_cut_constrained_output(llm):
    stop = SamplingParams(max_tokens=30, temperature=0, stop=["de"], structured_outputs=S(regex="abc(def)+"))
    cut = SamplingParams(max_tokens=3, temperature=0,
                         structured_outputs=S(json={"type": "array", "items": {"type": "string"}, "minItems": 4}))
    a, b = llm.generate(["x", "y"], [stop, cut], use_tqdm=False)
    assert a.outputs[0].text == "abc" and a.outputs[0].finish_reason == "stop"
    assert b.outputs[0].finish_reason == "length" and b.outputs[0].text.startswith("[")


def test_request_waits_for_its_grammar_without_blocking_others(llm):
    engine = llm.engine
    pending: Future = Future()
    spec = S(regex="[0-9]{4}")
    real = engine.structured.submit(spec).result()
    engine.add_request("slow", "Hi", SamplingParams(max_tokens=8, temperature=0, structured_outputs=spec))
    engine.scheduler.requests["slow"].grammar.compiled = pending  # as if still compiling
    engine.add_request("free", "Hello", SamplingParams(max_tokens=5, temperature=0))
    done = {}
    while "free" not in done:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.scheduler.requests["slow"].num_output_tokens == 0  # never scheduled yet
    pending.set_result(real)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert re.fullmatch("[0-9]{4}", done["slow"].outputs[0].text)


def test_bad_constraints_name_the_field(llm):
    with pytest.raises(InvalidParameterError) as e:
        S(json={"type": "object", "properties": {"a": {"type": 5}}})
    assert e.value.param == "structured_outputs.json"
    with pytest.raises(InvalidParameterError) as e:
        S(regex="(unclosed")
    assert e.value.param == "structured_outputs.regex"
    for bad in ({}, {"choice": []}, {"regex": "a", "choice": ["a"]}):
        with pytest.raises(InvalidParameterError):
            S(**bad)
    # a grammar only the compiler can refuse: the request ends in an error, never reaching a step,
    # and once known bad the same grammar is refused at once
    bad = S(grammar="root ::= undefined_rule")
    out = llm.generate(["x"], SamplingParams(max_tokens=5, structured_outputs=bad), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "structured_outputs.grammar" in (out.error or "")
    with pytest.raises(InvalidParameterError) as e:
        llm.engine.add_request("again", "x", SamplingParams(max_tokens=5, structured_outputs=bad))
    assert e.value.param == "structured_outputs.grammar"
    assert not llm.engine.has_unfinished_requests()


def test_grammar_state_follows_the_output_tokens_it_is_given(llm):
    """The matcher always describes the output it is synced to: it catches up on new tokens,
    rolls back when the output is shorter, and rewinds to the common prefix when it differs."""
    from engine.structured_output.grammar_state import GrammarState

    tok = llm.get_tokenizer()
    future = llm.engine.structured.submit(S(choice=["abcdef", "abxyz"]))
    state = GrammarState(future)

    def allowed_after(ids):
        import xgrammar as xgr

        state.sync(ids)
        mask = xgr.allocate_token_bitmask(1, 49152)
        state.fill(mask, 0)
        return {i for i in range(49152) if (mask[0, i // 32] >> (i % 32)) & 1}

    a, b = tok.encode("ab", add_special_tokens=False), tok.encode("abc", add_special_tokens=False)
    fresh = allowed_after([])
    after_ab = allowed_after(a)
    assert allowed_after(b) != after_ab  # moved on
    assert allowed_after(a) == after_ab  # rolled back
    assert allowed_after([]) == fresh and not state.broken
