"""Streams checkpoint tensors (HF names) from safetensors files (single or sharded).

Tensors are yielded one at a time so a model's weights are never held twice in memory.
GGUF files are read by `gguf_weights.py`.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: str) -> list[str]:
    """The weight files of an HF checkpoint directory: the shards named by the index when there
    is one, otherwise every *.safetensors file. ValueError when there are none."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise ValueError(f"shards listed in {index} are missing: {absent}")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in model directory {directory!r}")
    return files


def iter_safetensors(directory: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor; with `lazy`, (name, safetensors slice) instead, valid
    until the next item: indexing it reads only the indexed part (a tensor-parallel rank reads
    its shard; `engine.models.tensor_parallel.take`)."""
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))
