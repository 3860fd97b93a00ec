"""Dequantized tensors of a GGUF file under HF checkpoint names.

Reading and dequantizing is the `gguf` package's job; the GGUF -> HF name mapping comes from
`gguf`'s tensor-name tables, and per-architecture fix-ups (undoing llama.cpp's permutation of the
Llama q/k rows, GPT-2's transposes) from transformers' GGUF tensor processors. This mirrors
`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint` but builds the name map once
instead of once per submodule, which made that function several times slower than the read.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def _name_map(arch: str, hf_names: list[str], num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF name, for the HF names the model expects."""
    import gguf

    arch_ids = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not arch_ids:
        raise ValueError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    table = gguf.get_tensor_name_map(arch_ids[0], num_layers)
    mapping = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def _hf_names(hf_config) -> list[str]:
    # The HF state-dict keys of this config, from a meta-device model (no memory allocated).
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(hf_config).state_dict())


def _owned(array: np.ndarray) -> np.ndarray:
    # Unquantized tensors come back as read-only views of the memory-mapped file.
    return np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def iter_gguf(path: str, hf_config, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor in `dtype`) for every GGUF tensor the HF architecture uses."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict())
    mapping = _name_map(arch, _hf_names(hf_config), hf_config.num_hidden_layers)
    side_outputs: dict = {"tensors": {}}  # processors may emit renamed tensors here (GPT-2's output)
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=side_outputs
        )
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(_owned(result.weights)).to(dtype)
    for name, value in side_outputs["tensors"].items():
        yield name, value.to(dtype)
