import os

import torch

os.environ.setdefault("CONVEYOR_DEBUG", "1")  # LLMEngine checks its block accounting after every step
# Triton kernels run through Triton's interpreter on machines without a GPU. This must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# One thread: the reference models here are small, and on a shared 2-core machine a second
# OpenMP thread made them up to 10x slower (benchmarks/RESULTS.md).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct GGUF) as one float32 `LLM`, loaded once for the
    whole run: test_smollm2.py and the docs examples share it."""
    from engine import LLM

    return LLM(dtype="float32", num_blocks=512)
