"""The default model's Q4_1 projections (engine/models/gguf_q4_1.py): every linear of the GGUF
keeps its blocks, the Q4_1 kernel gives exactly the float32 panels' bits for the steps it runs,
and greedy output is the same with and without it. Uses the session's default model."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.kernels import cpu_gemm, q4_1_linear
from engine.models.parallel_linear import GateUpLinear, PackableLinear


@pytest.fixture(scope="module")
def model(default_llm):
    m = default_llm.engine.model
    reason = q4_1_linear.unsupported_reason(torch.device("cpu"))
    if reason is not None or m.linear_backend != "cpu":
        pytest.skip(f"no Q4_1 kernel here: {reason or m.linear_backend}")
    return m


def projections(model) -> list[PackableLinear]:
    return [m for m in model.modules() if isinstance(m, PackableLinear)]


def test_every_projection_keeps_its_q4_1_blocks(model):
    linears = projections(model)
    assert len(linears) == 4 * model.dims.num_layers  # qkv, o, gate_up, down
    assert all(isinstance(m.q4, q4_1_linear.Q4_1Weight) for m in linears)
    assert all(m.q4.out_features == m.out_features and m.q4.in_features == m.in_features for m in linears)


def test_q4_1_steps_have_the_float32_panels_bits(model):
    gen = torch.Generator().manual_seed(0)
    for layer in (model.model.layers[0], model.model.layers[-1]):
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            for rows in (1, 3, PackableLinear.Q4_MAX_ROWS):
                x = torch.randn(rows, proj.in_features, generator=gen)
                assert torch.equal(proj.local(x, proj.bias), cpu_gemm.linear(x, proj.packed, proj.bias))
                if isinstance(proj, GateUpLinear):  # unfused on Q4_1, fused in the GEMM's epilogue
                    assert torch.equal(proj.silu_and_mul_forward(x), cpu_gemm.silu_and_mul_linear(x, proj.packed, proj.bias))


def test_greedy_output_is_the_same_without_the_q4_1_blocks(default_llm, model):
    # Two sequences: every decode step has 2 rows, so the Q4_1 kernel runs them; prefills do not.
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with_q4 = [list(o.outputs[0].token_ids) for o in default_llm.generate(prompts, params, use_tqdm=False)]
    saved = {m: m.q4 for m in projections(model)}
    try:
        for m in saved:
            m.q4 = None
        without = [list(o.outputs[0].token_ids) for o in default_llm.generate(prompts, params, use_tqdm=False)]
    finally:
        for m, q4 in saved.items():
            m.q4 = q4
    assert with_q4 == without
    assert len(set(with_q4[0])) > 1
