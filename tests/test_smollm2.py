"""The default model (SmolLM2-135M-Instruct GGUF): long, varied greedy generations equal
transformers running the same dequantized weights."""
import os

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models.default_model import default_gguf_path

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Translate 'good morning' into Spanish and German.",
]
MAX_NEW = 40


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_blocks=512)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def test_default_model_greedy_matches_transformers(llm, reference):
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW), use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        x = torch.tensor([prompt_ids])
        ref = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.outputs[0].token_ids == ref[0, len(prompt_ids):].tolist()
    assert "Paris" in outs[0].outputs[0].text


def test_chat_and_string_prompts(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")
    text_out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5),
                            use_tqdm=False)[0]
    assert text_out.prompt == "The capital of France is" and len(text_out.outputs[0].token_ids) == 5
