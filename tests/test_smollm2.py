"""The default model (SmolLM2-135M-Instruct GGUF): long, varied greedy generations equal
transformers running the same dequantized weights (float32; the engine is the suite's shared
`default_llm`, the reference is transformers' Llama filled from our GGUF reader's HF-named
tensors, which tests/test_loader.py checks against transformers' own GGUF loader)."""
import pytest
import torch

from engine import SamplingParams
from engine.models.default_model import default_gguf_path
from engine.models.gguf_weights import iter_gguf

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish and German.",
]
MAX_NEW = 48


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def reference(llm):
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    config = llm.engine.hf_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(iter_gguf(path, config, torch.float32))
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_default_model_greedy_matches_transformers(llm, reference):
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW), use_tqdm=False)
    # Teacher forcing: one transformers forward over prompt + our tokens gives, at every
    # position, the token transformers' greedy search picks after the same prefix (EOS masked,
    # as min_tokens does) -- the same check as its generate(), in one pass instead of MAX_NEW.
    eos = {reference.config.eos_token_id, tok.eos_token_id} - {None}
    for prompt_ids, out in zip(ids, outs):
        ours = list(out.outputs[0].token_ids)
        assert len(ours) == MAX_NEW
        with torch.no_grad():
            logits = reference(torch.tensor([prompt_ids + ours[:-1]])).logits[0, len(prompt_ids) - 1:]
        logits[:, sorted(eos)] = float("-inf")
        want = logits.argmax(-1).tolist()
        first = next((i for i, (a, b) in enumerate(zip(ours, want)) if a != b), None)
        assert first is None, f"diverges at new token {first}: ours {ours[first:first + 5]}, transformers {want[first:first + 5]}"
    assert "Paris" in outs[0].outputs[0].text


def test_chat_and_string_prompts(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")
    text_out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5),
                            use_tqdm=False)[0]
    assert text_out.prompt == "The capital of France is" and len(text_out.outputs[0].token_ids) == 5
