"""Malformed adapter folders are refused by `load_adapter` with a `LoRAError` naming the field,
never another exception (which the server would turn into a 500): broken or hostile
adapter_config.json files, bad rank/alpha values, weights of the wrong shape, half a pair, an
unreadable weight file. Hand-written folders on a two-layer target map: no model, no peft."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.lora import LoRAError, LoRARequest
from engine.lora.adapter import load_adapter
from engine.lora.targets import ModelTargets, TargetSite

HIDDEN, RANK = 8, 2
TARGETS = ModelTargets("model.layers", 2, (
    TargetSite("self_attn.q_proj", "self_attn.qkv_proj", 0, HIDDEN, HIDDEN),
    TargetSite("self_attn.o_proj", "self_attn.o_proj", 0, HIDDEN, HIDDEN),
))
PREFIX = "base_model.model.model.layers"


def _weights(layers=(0, 1), a_shape=(RANK, HIDDEN), halves=("A", "B")) -> dict[str, torch.Tensor]:
    shapes = {"A": a_shape, "B": (HIDDEN, RANK)}
    return {f"{PREFIX}.{layer}.self_attn.q_proj.lora_{h}.weight": torch.randn(shapes[h])
            for layer in layers for h in halves}


def _folder(tmp_path, name: str, config=None, raw_config: str | None = None, weights=None):
    path = tmp_path / name
    path.mkdir()
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "target_modules": ["q_proj"], **(config or {})}
    (path / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
    save_file(_weights() if weights is None else weights, str(path / "adapter_model.safetensors"))
    return LoRARequest(name, 1, str(path))


def _load(request: LoRARequest):
    return load_adapter(request, TARGETS, max_rank=16, base_config={"model_type": "llama", "hidden_size": HIDDEN})


def test_a_well_formed_folder_loads(tmp_path):
    adapter = _load(_folder(tmp_path, "ok"))
    assert adapter.rank == RANK and adapter.scaling == 2.0 and len(adapter.weights) == 2


@pytest.mark.parametrize("case, param, words", [
    (dict(raw_config="{not json"), "lora_path", "adapter_config.json cannot be read"),
    (dict(raw_config="[" * 200_000), "lora_path", "RecursionError"),  # nested past the parser's depth
    (dict(raw_config="[1, 2]"), "lora_path", "JSON object"),
    (dict(config={"r": "8"}), "rank", "positive integer"),
    (dict(config={"r": 0}), "rank", "positive integer"),
    (dict(config={"r": 10 ** 30}), "rank", "above max_lora_rank"),
    (dict(raw_config='{"r": 2, "lora_alpha": NaN}'), "lora_alpha", "finite"),
    (dict(config={"lora_alpha": 10 ** 400}), "lora_alpha", "finite"),  # past float range
    (dict(config={"lora_alpha": "16"}), "lora_alpha", "number"),
    (dict(config={"target_modules": {"q_proj": 1}}), "target_modules", "list or a string"),
    (dict(weights=_weights(a_shape=(RANK + 1, HIDDEN))), "base_model_name_or_path", "shape"),
    (dict(weights=_weights(layers=(0, 5))), "base_model_name_or_path", "layer 5"),
    (dict(weights=_weights(halves=("A",))), "lora_path", "not its other half"),
    (dict(weights={f"{PREFIX}.0.mlp.router.lora_A.weight": torch.zeros(RANK, HIDDEN)}), "target_modules", "router"),
])
def test_malformed_folders_name_the_field(tmp_path, case, param, words):
    with pytest.raises(LoRAError) as e:
        _load(_folder(tmp_path, "bad", **case))
    assert e.value.param == param and words in str(e.value), str(e.value)


def test_unreadable_weights_and_a_base_model_config_that_is_no_config(tmp_path):
    request = _folder(tmp_path, "corrupt")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LoRAError) as e:
        _load(request)
    assert e.value.param == "lora_path" and "cannot be read" in str(e.value)
    # base_model_name_or_path names a folder whose config.json is a JSON list: nothing to compare
    (tmp_path / "odd-base").mkdir()
    (tmp_path / "odd-base" / "config.json").write_text('["model_type", "hidden_size"]')
    assert _load(_folder(tmp_path, "odd", config={"base_model_name_or_path": str(tmp_path / "odd-base")})).rank == RANK
