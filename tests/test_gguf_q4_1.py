"""The default model's Q4_1 projections (engine/models/gguf_q4_1.py): every linear of the GGUF
runs from its blocks, fused in the layer's row order, with exactly the bits the float32 GEMM
gives on the dequantized weights. (Greedy tokens and logits against transformers: test_smollm2.py
and test_loader.py, which now run this path.) Uses the session's default model."""
from __future__ import annotations

import os

import pytest
import torch

from engine.kernels import cpu_gemm, q4_linear
from engine.models.gguf_weights import iter_gguf
from engine.models.loader import gguf_cache_dir, resolve_model
from engine.models.parallel_linear import GateUpLinear, PackableLinear


@pytest.fixture(scope="module")
def llm(default_llm):
    reason = q4_linear.unsupported_reason(torch.device("cpu"))
    if reason is not None or default_llm.engine.model.linear_backend != "cpu":
        pytest.skip(f"no Q4_1 kernel here: {reason or default_llm.engine.model.linear_backend}")
    return default_llm


def test_every_projection_runs_from_its_q4_1_blocks(llm):
    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, PackableLinear)]
    assert len(linears) == 4 * model.dims.num_layers  # qkv, o, gate_up, down
    for m in linears:
        assert isinstance(m.q4, q4_linear.Q4Weight) and m.packed is None
        assert (m.q4.out_features, m.q4.in_features) == (m.out_features, m.in_features)
        assert m.weight.device.type == "meta"  # the float32 copy is gone


def test_fused_q4_1_projections_have_the_float32_gemm_bits(llm):
    model, cfg = llm.engine.model, llm.engine.hf_config
    src = resolve_model(None)  # the default model, which the session's LLM serves
    path = os.path.join(src.path, src.gguf_file)
    last = model.dims.num_layers - 1
    wanted = {f"model.layers.{i}.{p}.weight": None for i in (0, last) for p in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    for name, tensor in iter_gguf(path, cfg, torch.float32, gguf_cache_dir(path)):
        if name in wanted:
            wanted[name] = tensor
    gen = torch.Generator().manual_seed(0)
    for i in (0, last):
        w = lambda p: wanted[f"model.layers.{i}.{p}.weight"]  # noqa: E731
        layer = model.model.layers[i]
        cases = [(layer.self_attn.qkv_proj, torch.cat([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")])),
                 (layer.self_attn.o_proj, w("self_attn.o_proj")),
                 (layer.mlp.gate_up_proj, torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")])),
                 (layer.mlp.down_proj, w("mlp.down_proj"))]
        for proj, dense in cases:
            panels = cpu_gemm.pack_gate_up(dense) if isinstance(proj, GateUpLinear) else cpu_gemm.pack(dense)
            for rows in (1, 5, 37):
                x = torch.randn(rows, proj.in_features, generator=gen)
                assert torch.equal(proj.local(x, proj.bias), cpu_gemm.linear(x, cpu_gemm.pack(dense), proj.bias))
                if isinstance(proj, GateUpLinear):  # unfused on Q4_1, in the GEMM's epilogue on panels
                    assert torch.equal(proj.silu_and_mul_forward(x), cpu_gemm.silu_and_mul_linear(x, panels, proj.bias))
